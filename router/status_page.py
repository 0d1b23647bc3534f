"""The ops status page: one read-only picture of queues, agents, drivers and dead letters.

Routes, added to the ops API by `StatusPage.add_routes`:

* `GET /dashboard`: the page (plain HTML, one script, one style sheet under
  `router/static/`, no build step). It holds no data itself: its script polls
  `GET /v1/status` every 2 s and shows a login form while that answers 401.
* `POST /dashboard/login`: the form posts the admin token; when it matches, the server
  keeps a random session id in memory and sets it as an HttpOnly, SameSite=Strict
  cookie (browsers cannot send a bearer header by themselves). `POST /dashboard/logout`
  forgets it. Sessions die with the process or after `SESSION_TTL`. Past
  `LOGIN_FAILURES_PER_MINUTE` wrong tokens a minute, logins answer 429.
* `GET /v1/status`: the JSON, for the bearer token (as every /v1 route) or the cookie.

Every answer carries a strict Content-Security-Policy (no inline script or style),
and the script renders every value with textContent: subjects customers wrote, agent
names and driver errors are shown as text, never parsed as markup.
"""

from __future__ import annotations

import hmac
import json
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from router.ops import OpsApi, dead_letter_view

STATIC = Path(__file__).with_name("static")
COOKIE = "omnirouter_status"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 256  # the oldest session is dropped past this (memory stays bounded)
NEWEST_DEAD_LETTERS = 5
# Wrong tokens accepted per minute (all clients together) before logins answer 429: a
# configured token may be short, and the form must not become a guessing oracle.
LOGIN_FAILURES_PER_MINUTE = 10
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_ASSETS = {
    "/dashboard": ("status.html", "text/html; charset=utf-8"),
    "/dashboard/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/dashboard/status.css": ("status.css", "text/css; charset=utf-8"),
}


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    content_type: str


class StatusPage:
    """The status page's routes over the ops API's collaborators."""

    def __init__(
        self, ops: OpsApi, admin_token: bytes, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Read the committed static files; sessions start empty."""
        self.ops = ops
        self._token = admin_token
        self._clock = clock
        self._sessions: OrderedDict[str, float] = OrderedDict()  # session id -> expiry
        self._failures: deque[float] = deque(maxlen=LOGIN_FAILURES_PER_MINUTE)
        self._assets = {
            path: _Asset((STATIC / name).read_bytes(), ctype)
            for path, (name, ctype) in _ASSETS.items()
        }

    def add_routes(self, app: web.Application) -> None:
        """Add the page, its assets, the login and the JSON to the ops API's app."""
        for path in self._assets:
            app.router.add_get(path, self.asset)
        app.router.add_post("/dashboard/login", self.login)
        app.router.add_post("/dashboard/logout", self.logout)
        app.router.add_get("/v1/status", self.status)

    # -- sessions ------------------------------------------------------------------------

    def _token_ok(self, token: str) -> bool:
        # compare_digest takes the same time whatever the first differing byte.
        return hmac.compare_digest(token.strip().encode(), self._token)

    def _session_ok(self, request: web.Request) -> bool:
        sid = request.cookies.get(COOKIE, "")
        expiry = self._sessions.get(sid)
        if expiry is None:
            return False
        if expiry < self._clock():
            del self._sessions[sid]
            return False
        return True

    def _authorised(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return self._token_ok(token)
        return self._session_ok(request)

    def _new_session(self) -> str:
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = self._clock() + SESSION_TTL
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return sid

    # -- routes ------------------------------------------------------------------------

    async def asset(self, request: web.Request) -> web.Response:
        """Serve the page, its script or its style sheet (committed files, no data)."""
        asset = self._assets[request.path]
        return web.Response(
            body=asset.body, headers={**HEADERS, "Content-Type": asset.content_type}
        )

    async def login(self, request: web.Request) -> web.Response:
        """Check the posted token; on a match set the session cookie. Back to the page."""
        now = self._clock()
        if len(self._failures) == self._failures.maxlen and now - self._failures[0] < 60:
            return web.json_response(
                {"error": {"code": "too_many_logins", "message": "too many wrong tokens; wait"}},
                status=429,
                headers={**HEADERS, "Retry-After": str(int(60 - (now - self._failures[0])) + 1)},
            )
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not self._token_ok(token):
            self._failures.append(now)
            return _see_other("/dashboard?login=failed")
        answer = _see_other("/dashboard")
        answer.set_cookie(
            COOKIE,
            self._new_session(),
            max_age=int(SESSION_TTL),
            path="/",
            httponly=True,
            samesite="Strict",
            # Only over HTTPS (directly or behind a proxy that says so): a plain-HTTP
            # ops API on loopback would otherwise never get the cookie back.
            secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
        )
        return answer

    async def logout(self, request: web.Request) -> web.Response:
        """Forget the session and clear the cookie."""
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        answer = _see_other("/dashboard")
        answer.del_cookie(COOKIE, path="/")
        return answer

    async def status(self, request: web.Request) -> web.Response:
        """Answer the whole picture as JSON (bearer token or session cookie)."""
        if not self._authorised(request):
            return web.json_response(
                {"error": {"code": "unauthorized", "message": "bearer token or login required"}},
                status=401,
                headers={**HEADERS, "WWW-Authenticate": 'Bearer realm="omnirouter"'},
            )
        return web.json_response(await self.snapshot(), headers=HEADERS, dumps=_dumps)

    async def snapshot(self) -> dict[str, Any]:
        """Gather readiness, the pipeline's board and the newest dead letters."""
        ops = self.ops
        report = await ops.health.readiness()
        board = await ops.agents.status_board()
        newest = await ops.dead_letters.dead_letters(NEWEST_DEAD_LETTERS)
        return {
            "version": ops.health.version,
            "ready": report["ready"],
            "stopping": report.get("stopping", False),
            "store": report.get("store", "ok"),
            "drivers": report.get("drivers", {}),
            "degraded": report.get("degraded", []),
            **board,
            "dead_letters": {
                "count": board.get("outbox", {}).get("dead", len(newest)),
                "newest": [dead_letter_view(d) for d in newest],
            },
        }


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, default=str)


def _see_other(location: str) -> web.Response:
    """Return a 303 to the page (returned, not raised: the ops app answers errors as JSON)."""
    return web.Response(status=303, headers={**HEADERS, "Location": location})
