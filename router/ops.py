"""The operations API: health, readiness, metrics and a small admin surface.

`/healthz` answers as long as the event loop runs (liveness); `/readyz` answers 200
only when the store answers and every enabled channel and adapter is connected, and
lists each one's state either way. Admin endpoints need the bearer token, compared
in constant time; `/healthz`, `/readyz` and `/metrics` are open to the local scraper.
`POST /v1/dead-letters/replay` with `{"ids": [...]}` or `{"all": true}` moves dead
letters back to the outbox and sends them at once (as `omnirouter dead-letters replay`).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from router.drivers import AgentAction, Presence
from router.http import HttpLimits, new_app
from router.model import LABELS

if TYPE_CHECKING:
    from router.daemon import Daemon

_JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
# At most this many ids per replay request (the request body is capped at 16 KiB).
MAX_REPLAY_IDS = 400
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, ensure_ascii=False, default=str).encode(),
        status=status,
        content_type="application/json",
        headers=_JSON_HEADERS,
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def build_app(daemon: Daemon) -> web.Application:
    """Return the ops application bound to a running daemon."""
    # JSON errors, body read timeout, no Server banner: see router.http.
    app = new_app(HttpLimits(read_timeout=daemon.config.ops.read_timeout, max_body_bytes=16 * 1024))

    def admin(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            expected = daemon.admin_token.encode()
            # compare_digest takes the same time whatever the first differing byte.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), expected
            ):
                return web.Response(
                    status=401,
                    text='{"error":{"code":"unauthorized","message":"bearer token required"}}',
                    content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="omnirouter"', **_JSON_HEADERS},
                )
            return await handler(request)

        return guarded

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok", "version": daemon.version})

    async def readyz(request: web.Request) -> web.Response:
        report = await daemon.readiness()
        return _json(report, 200 if report["ready"] else 503)

    async def metrics(request: web.Request) -> web.Response:
        daemon.refresh_metrics()
        resp = web.Response(body=daemon.metrics.render(), headers={"Cache-Control": "no-store"})
        resp.headers["Content-Type"] = daemon.metrics.content_type
        return resp

    async def agents(request: web.Request) -> web.Response:
        return _json({"agents": daemon.pipeline.agents_view()})

    async def queues(request: web.Request) -> web.Response:
        return _json({"queues": daemon.pipeline.queues_view()})

    async def presence(request: web.Request) -> web.Response:
        agent_id = request.match_info["agent_id"]
        state = request.match_info["state"]
        if state not in tuple(Presence):
            return _error(400, "bad_presence", "presence must be 'on', 'away' or 'off'")
        if not await daemon.pipeline.set_presence(agent_id, state == "on", away=state == "away"):
            return _error(404, "unknown_agent", f"no agent with id {agent_id!r}")
        return _json({"agent": agent_id, "present": state == "on", "presence": state})

    async def dead_letters(request: web.Request) -> web.Response:
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return _error(400, "bad_limit", "limit must be an integer")
        items = await daemon.store.dead_letters(limit)
        return _json({"dead_letters": [dead_letter_view(d) for d in items]})

    async def replay_dead_letters(request: web.Request) -> web.Response:
        # {"ids": [...]} or {"all": true}: move dead letters back to the outbox and send now.
        try:
            body = await request.json() if request.body_exists else {}
        except ValueError:
            return _error(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "the body must be a JSON object")
        replay_all = body.get("all") is True
        ids = body.get("ids")
        if replay_all == (ids is not None):
            return _error(400, "invalid_body", 'give either "ids" (a list) or "all": true')
        if not replay_all and (
            not isinstance(ids, list)
            or not ids
            or len(ids) > MAX_REPLAY_IDS
            or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)
        ):
            return _error(
                400, "invalid_ids", f"ids must be 1-{MAX_REPLAY_IDS} dead letter ids (strings)"
            )
        now = time.time()
        count = await daemon.store.replay_dead_letters(None if replay_all else ids, now)
        if count:
            # Hand them to the dispatcher at once rather than at its next store scan.
            for item in await daemon.store.due_outbox(now, 1000):
                daemon.dispatcher.submit(item)
        return _json({"replayed": count})

    async def relabel(request: web.Request) -> web.Response:
        # {"label": "complaint", "agent": "alice"}: an agent corrects the classifier; the
        # correction is kept for `omnirouter classifier corrections` and retraining.
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "the body must be a JSON object")
        label, agent = body.get("label"), body.get("agent", "ops")
        if label not in LABELS:
            return _error(400, "invalid_label", f"label must be one of {', '.join(LABELS)}")
        if not isinstance(agent, str) or not 0 < len(agent) <= 64:
            return _error(400, "invalid_agent", "agent must be a short string")
        message_id = request.match_info["message_id"]
        if not await daemon.store.record_correction(message_id, label, agent, time.time()):
            return _error(404, "unknown_message", f"no message with id {message_id!r}")
        return _json({"message_id": message_id, "label": label})

    async def accept(request: web.Request) -> web.Response:
        # {"agent": "alice"}: the agent takes up the message's conversation (for tools
        # that cannot send actions themselves, e.g. a chat bot behind a webhook).
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not valid JSON")
        agent = body.get("agent") if isinstance(body, dict) else None
        if not isinstance(agent, str) or not 0 < len(agent) <= 64:
            return _error(400, "invalid_agent", 'give the accepting agent: {"agent": "alice"}')
        message_id = request.match_info["message_id"]
        outcome = await daemon.pipeline.act(
            AgentAction(agent_id=agent, action="accept", message_id=message_id)
        )
        if outcome != "ok":
            return _error(409, "not_offered", f"{message_id!r} is not with {agent!r}")
        return _json({"message_id": message_id, "agent": agent, "accepted": True})

    app.router.add_post("/v1/messages/{message_id}/label", admin(relabel))
    app.router.add_post("/v1/messages/{message_id}/accept", admin(accept))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/agents", admin(agents))
    app.router.add_get("/v1/queues", admin(queues))
    app.router.add_post("/v1/agents/{agent_id}/presence/{state}", admin(presence))
    app.router.add_put("/v1/agents/{agent_id}/presence/{state}", admin(presence))
    app.router.add_get("/v1/dead-letters", admin(dead_letters))
    app.router.add_post("/v1/dead-letters/replay", admin(replay_dead_letters))
    return app


def dead_letter_view(d: Any) -> dict[str, Any]:
    """Return a dead letter without its payload (customer data stays out of listings)."""
    return {
        "id": d.id,
        "target": d.target,
        "agent_id": d.agent_id,
        "kind": d.kind,
        "message_id": d.message_id,
        "attempts": d.attempts,
        "reason": d.reason,
        "created_at": d.created_at,
        "dead_at": d.dead_at,
    }
