"""The operations API: health, readiness, metrics and a small admin surface.

`/healthz` answers as long as the event loop runs (liveness); `/readyz` answers 200
only when the store answers and every enabled channel and adapter is connected, and
lists each one's state either way. Admin endpoints need the bearer token, compared
in constant time; `/healthz`, `/readyz` and `/metrics` are open to the local scraper.
`POST /v1/dead-letters/replay` with `{"ids": [...]}` or `{"all": true}` moves dead
letters back to the outbox and sends them at once (as `omnirouter dead-letters replay`).
`GET /v1/tickets/{ticket}/events` lists a ticket's audit (as `omnirouter ticket history`).

`OpsApi` sees the daemon only through the small protocols below, each satisfied by
whatever the daemon passes in; it never imports the daemon.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web

from router.actions import ActionError, parse_action
from router.agent_work import Verdict
from router.contacts import ContactChange
from router.drivers import AgentAction, Presence
from router.http import HttpLimits, new_app
from router.model import LABELS, TICKET_PREFIX
from router.openapi import add_openapi_route
from router.store import DeadLetter, TicketEvent

_JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
# At most this many ids per replay request (the request body is capped at 16 KiB).
MAX_REPLAY_IDS = 400
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- what the API needs from the rest of the daemon ---------------------------------------


class Health(Protocol):
    """What /healthz and /readyz read: the running version and a readiness report."""

    @property
    def version(self) -> str:
        """Return the running version."""
        ...

    async def readiness(self) -> dict[str, Any]:
        """Return the readiness report; its "ready" key decides 200 or 503."""
        ...


class MetricsPage(Protocol):
    """What /metrics serves: a freshly rendered exposition and its content type."""

    @property
    def content_type(self) -> str:
        """Return the exposition's Content-Type."""
        ...

    def render(self) -> bytes:
        """Return the current exposition, gauges refreshed."""
        ...


class AgentDesk(Protocol):
    """The pipeline's views and the agent actions the admin API may take."""

    def agents_view(self) -> list[dict[str, Any]]:
        """Return every agent with load and presence."""
        ...

    def queues_view(self) -> list[dict[str, Any]]:
        """Return every queue with its depth and waiting times."""
        ...

    async def status_board(self) -> dict[str, Any]:
        """Return queues by class and severity, agents, crisis alerts and outbox counts."""
        ...

    async def set_presence(self, agent_id: str, present: bool, *, away: bool = False) -> bool:
        """Set an agent's presence; False for an unknown agent."""
        ...

    async def act(self, action: AgentAction) -> str:
        """Apply an agent action; return "ok" or why it was refused."""
        ...

    async def decide(self, action: AgentAction, *, notify: bool = False) -> Verdict:
        """Apply an agent action; return its outcome and, when refused, the reason."""
        ...


class DeadLetterDesk(Protocol):
    """Dead letters as operators handle them: listed, and replayed into the outbox."""

    async def dead_letters(self, limit: int) -> Sequence[DeadLetter]:
        """Return at most limit dead letters, newest first."""
        ...

    async def replay(self, ids: list[str] | None) -> int:
        """Move dead letters (all when ids is None) back to the outbox, send now; count them."""
        ...


class Corrections(Protocol):
    """Where an agent's relabelling of a message is kept for retraining."""

    async def record_correction(
        self, message_id: str, label: str, agent_id: str, at: float
    ) -> bool:
        """Store the correction; False for an unknown message."""
        ...


class TicketHistory(Protocol):
    """The tickets' audit: every transition and agent action, who and when."""

    async def ticket_events(self, conversation_id: str) -> list[TicketEvent]:
        """Return a ticket's audit rows, oldest first."""
        ...


class ContactDesk(Protocol):
    """Contacts across channels: found, shown, merged and split by people (audited)."""

    async def find_contacts(self, query: str, limit: int = 20) -> list[dict[str, Any]]:
        """Return contacts whose handle, name or identifier contains `query`."""
        ...

    async def contact(self, ref: str) -> dict[str, Any] | None:
        """Return a contact with its handles, identifiers, tickets and audit."""
        ...

    async def merge_contacts(self, into: str, other: str, actor: str, reason: str) -> ContactChange:
        """Merge `other`'s contact into `into`'s."""
        ...

    async def unmerge_contact(self, ref: str, actor: str, reason: str) -> ContactChange:
        """Undo the merge that made `ref`'s contact part of another."""
        ...


# -- answers -----------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, ensure_ascii=False, default=str).encode(),
        status=status,
        content_type="application/json",
        headers=_JSON_HEADERS,
    )


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def dead_letter_view(d: DeadLetter) -> dict[str, Any]:
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


# -- the API -----------------------------------------------------------------------------


class OpsApi:
    """The ops routes, one method each, over the narrow interfaces they need."""

    def __init__(
        self,
        *,
        health: Health,
        metrics: MetricsPage,
        agents: AgentDesk,
        dead_letters: DeadLetterDesk,
        corrections: Corrections,
        admin_token: str,
        history: TicketHistory | None = None,
        contacts: ContactDesk | None = None,
        limits: HttpLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Bind the API to its collaborators; admin_token guards the /v1 routes."""
        self.health = health
        self.metrics = metrics
        self.agents = agents
        self.dead_letters = dead_letters
        self.corrections = corrections
        self.history = history
        self.contacts = contacts
        self.clock = clock
        self.read_timeout = (limits or HttpLimits()).read_timeout
        self._admin_token = admin_token.encode()

    def app(self) -> web.Application:
        """Return an aiohttp application serving every route."""
        # JSON errors, body read timeout, no Server banner: see router.http.
        app = new_app(HttpLimits(read_timeout=self.read_timeout, max_body_bytes=16 * 1024))
        admin = self._admin
        app.router.add_post("/v1/messages/{message_id}/label", admin(self.relabel))
        app.router.add_post("/v1/messages/{message_id}/accept", admin(self.accept))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/v1/agents", admin(self.list_agents))
        app.router.add_get("/v1/queues", admin(self.list_queues))
        app.router.add_post("/v1/agents/{agent_id}/presence/{state}", admin(self.presence))
        app.router.add_put("/v1/agents/{agent_id}/presence/{state}", admin(self.presence))
        app.router.add_get("/v1/dead-letters", admin(self.list_dead_letters))
        app.router.add_post("/v1/dead-letters/replay", admin(self.replay_dead_letters))
        app.router.add_get("/v1/tickets/{ticket}/events", admin(self.ticket_events))
        app.router.add_post("/v1/tickets/{ticket}/actions", admin(self.ticket_action))
        app.router.add_get("/v1/contacts", admin(self.find_contacts))
        app.router.add_post("/v1/contacts/merge", admin(self.merge_contacts))
        app.router.add_get("/v1/contacts/{ref}", admin(self.show_contact))
        app.router.add_post("/v1/contacts/{ref}/unmerge", admin(self.unmerge_contact))
        from router.status_page import StatusPage  # imported here: it imports this module

        StatusPage(self, self._admin_token).add_routes(app)
        add_openapi_route(app, "ops")
        return app

    def _admin(self, handler: Handler) -> Handler:
        """Wrap handler so that it answers 401 without the right bearer token."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            # compare_digest takes the same time whatever the first differing byte.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self._admin_token
            ):
                return web.Response(
                    status=401,
                    text='{"error":{"code":"unauthorized","message":"bearer token required"}}',
                    content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer realm="omnirouter"', **_JSON_HEADERS},
                )
            return await handler(request)

        return guarded

    # -- open routes ---------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        """Answer while the loop runs (liveness), with the version."""
        return _json({"status": "ok", "version": self.health.version})

    async def readyz(self, request: web.Request) -> web.Response:
        """Answer the readiness report: 200 when ready, 503 otherwise."""
        report = await self.health.readiness()
        return _json(report, 200 if report["ready"] else 503)

    async def metrics_page(self, request: web.Request) -> web.Response:
        """Answer the Prometheus exposition."""
        resp = web.Response(body=self.metrics.render(), headers={"Cache-Control": "no-store"})
        resp.headers["Content-Type"] = self.metrics.content_type
        return resp

    # -- admin routes --------------------------------------------------------------------

    async def list_agents(self, request: web.Request) -> web.Response:
        """List agents with load and presence."""
        return _json({"agents": self.agents.agents_view()})

    async def list_queues(self, request: web.Request) -> web.Response:
        """List queues with their waiting messages."""
        return _json({"queues": self.agents.queues_view()})

    async def presence(self, request: web.Request) -> web.Response:
        """Set an agent on, away or off."""
        agent_id = request.match_info["agent_id"]
        state = request.match_info["state"]
        if state not in tuple(Presence):
            return _error(400, "bad_presence", "presence must be 'on', 'away' or 'off'")
        if not await self.agents.set_presence(agent_id, state == "on", away=state == "away"):
            return _error(404, "unknown_agent", f"no agent with id {agent_id!r}")
        return _json({"agent": agent_id, "present": state == "on", "presence": state})

    async def list_dead_letters(self, request: web.Request) -> web.Response:
        """List dead letters (?limit=1..1000), without payloads."""
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return _error(400, "bad_limit", "limit must be an integer")
        items = await self.dead_letters.dead_letters(limit)
        return _json({"dead_letters": [dead_letter_view(d) for d in items]})

    async def replay_dead_letters(self, request: web.Request) -> web.Response:
        """Replay {"ids": [...]} or {"all": true} dead letters."""
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
        count = await self.dead_letters.replay(None if replay_all else ids)
        return _json({"replayed": count})

    async def relabel(self, request: web.Request) -> web.Response:
        """Keep an agent's correction of a message's label ({"label": …, "agent": …})."""
        # The correction feeds `omnirouter classifier corrections` and retraining.
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
        if not await self.corrections.record_correction(message_id, label, agent, self.clock()):
            return _error(404, "unknown_message", f"no message with id {message_id!r}")
        return _json({"message_id": message_id, "label": label})

    async def accept(self, request: web.Request) -> web.Response:
        """Let an agent take up a message's conversation ({"agent": "alice"})."""
        # For tools that cannot send actions themselves, e.g. a chat bot behind a webhook.
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not valid JSON")
        agent = body.get("agent") if isinstance(body, dict) else None
        if not isinstance(agent, str) or not 0 < len(agent) <= 64:
            return _error(400, "invalid_agent", 'give the accepting agent: {"agent": "alice"}')
        message_id = request.match_info["message_id"]
        outcome = await self.agents.act(
            AgentAction(agent_id=agent, action="accept", message_id=message_id)
        )
        if outcome != "ok":
            return _error(409, "not_offered", f"{message_id!r} is not with {agent!r}")
        return _json({"message_id": message_id, "agent": agent, "accepted": True})

    async def ticket_action(self, request: web.Request) -> web.Response:
        """Act on a ticket for a named agent: {"agent", "action", "value"?, "message_id"?}.

        For agents on tools that cannot send actions (a file inbox, a webhook) and for
        supervisors: the same rules as an action from the agent's own tool, audited
        under the agent's name. 200 with the outcome, 409 with the reason if refused.
        """
        ticket = request.match_info["ticket"]
        conversation_id = ticket[len(TICKET_PREFIX) :] if ticket.startswith(TICKET_PREFIX) else ""
        if not conversation_id or len(conversation_id) > 64:
            return _error(400, "bad_ticket", "give a ticket number such as T-01J…")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "invalid_json", "the body is not valid JSON")
        agent = body.get("agent") if isinstance(body, dict) else None
        if not isinstance(agent, str) or not 0 < len(agent) <= 64:
            return _error(400, "invalid_agent", 'name the acting agent: {"agent": "alice", …}')
        fields = {k: v for k, v in body.items() if k != "agent"}
        fields["conversation_id"] = conversation_id
        try:
            action = parse_action(agent, json.dumps(fields).encode())
        except ActionError as exc:
            return _error(400, "invalid_action", str(exc))
        verdict = await self.agents.decide(action)
        answer = {"ticket": ticket, "agent": agent, "action": action.action}
        if verdict.outcome != "ok":
            return _error(409, verdict.outcome, verdict.reason or f"{action.action} refused")
        return _json({**answer, "outcome": "ok"})

    async def ticket_events(self, request: web.Request) -> web.Response:
        """List a ticket's audit, oldest first ({"ticket": …, "events": [...]})."""
        ticket = request.match_info["ticket"]
        conversation_id = ticket[len(TICKET_PREFIX) :] if ticket.startswith(TICKET_PREFIX) else ""
        if not conversation_id or len(conversation_id) > 64:
            return _error(400, "bad_ticket", "give a ticket number such as T-01J…")
        events = await self.history.ticket_events(conversation_id) if self.history else []
        if not events:
            return _error(404, "unknown_ticket", f"no ticket {ticket!r}")
        return _json({"ticket": ticket, "events": [e.to_dict() for e in events]})

    # -- contacts across channels ---------------------------------------------------------

    async def find_contacts(self, request: web.Request) -> web.Response:
        """Find contacts by part of a handle, name or identifier (?q=…&limit=…)."""
        if self.contacts is None:
            return _error(404, "no_contacts", "contacts are not served here")
        query = request.query.get("q", "").strip()
        if not 0 < len(query) <= 200:
            return _error(400, "bad_query", "give ?q= with part of a handle, name or identifier")
        try:
            limit = max(1, min(200, int(request.query.get("limit", "20"))))
        except ValueError:
            return _error(400, "bad_limit", "limit must be a number")
        return _json({"contacts": await self.contacts.find_contacts(query, limit)})

    async def show_contact(self, request: web.Request) -> web.Response:
        """Show a contact (by id c_…, handle key sms:+49… or identifier phone:+49…)."""
        if self.contacts is None:
            return _error(404, "no_contacts", "contacts are not served here")
        ref = request.match_info["ref"]
        if not 0 < len(ref) <= 320:
            return _error(400, "bad_contact", "give a contact id, handle key or identifier")
        view = await self.contacts.contact(ref)
        if view is None:
            return _error(404, "unknown_contact", f"no contact {ref!r}")
        return _json(view)

    async def _contact_body(
        self, request: web.Request, *names: str
    ) -> dict[str, str] | web.Response:
        """Read a JSON object with the named short-string fields (actor and reason optional)."""
        try:
            text = await request.text()
            body = json.loads(text) if text.strip() else {}
        except ValueError:
            return _error(400, "invalid_json", "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "invalid_body", "the body must be a JSON object")
        out: dict[str, str] = {}
        for name in names:
            value = body.get(name)
            if not isinstance(value, str) or not 0 < len(value) <= 320:
                return _error(
                    400, f"invalid_{name}", f"{name} must be a contact id, handle or identifier"
                )
            out[name] = value
        actor, reason = body.get("actor", "ops"), body.get("reason", "")
        if not isinstance(actor, str) or not 0 < len(actor) <= 64:
            return _error(400, "invalid_actor", "actor must be a short string (who merges)")
        if not isinstance(reason, str) or len(reason) > 500:
            return _error(
                400, "invalid_reason", "reason must be a string of at most 500 characters"
            )
        out["actor"], out["reason"] = actor, reason
        return out

    async def merge_contacts(self, request: web.Request) -> web.Response:
        """Merge two contacts: {"into": A, "from": B, "actor"?, "reason"?} (audited)."""
        if self.contacts is None:
            return _error(404, "no_contacts", "contacts are not served here")
        body = await self._contact_body(request, "into", "from")
        if isinstance(body, web.Response):
            return body
        change = await self.contacts.merge_contacts(
            body["into"], body["from"], body["actor"], body["reason"]
        )
        if not change.ok:
            return _error(404 if change.code == "not_found" else 409, change.code, change.error)
        return _json({"merged": change.child, "into": change.parent, "actor": body["actor"]})

    async def unmerge_contact(self, request: web.Request) -> web.Response:
        """Undo the merge of a contact: {"actor"?, "reason"?} (audited)."""
        if self.contacts is None:
            return _error(404, "no_contacts", "contacts are not served here")
        body = await self._contact_body(request)
        if isinstance(body, web.Response):
            return body
        ref = request.match_info["ref"]
        change = await self.contacts.unmerge_contact(ref, body["actor"], body["reason"])
        if not change.ok:
            return _error(404 if change.code == "not_found" else 409, change.code, change.error)
        return _json({"unmerged": change.child, "from": change.parent, "actor": body["actor"]})
