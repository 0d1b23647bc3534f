"""Agent actions on the wire: what a two-way agent tool may send back, and its parser.

Every tool that listens for agent actions (MQTT today; chat apps and mailboxes next)
turns its transport's message into bytes of one JSON object and calls `parse_action`,
so the rules of what an action must carry live here once. What an action *does* is
the pipeline's business (router/agent_work.py).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from router.drivers import AgentAction, Presence
from router.model import LABELS


class Action(StrEnum):
    """What an agent can do from their tool."""

    ACCEPT = "accept"  # take up an offer (stops its accept timeout)
    RESOLVE = "resolve"  # close the conversation
    PRESENCE = "presence"  # on / away / off
    REPLY = "reply"  # answer the customer on their channel
    RELABEL = "relabel"  # correct the classifier's label (kept for retraining)
    TRANSFER = "transfer"  # hand the conversation to agent:<id> or queue:<name>


ACTIONS = frozenset(a.value for a in Action)
_ACTION_FIELDS = ("conversation_id", "message_id", "value")


class ActionError(ValueError):
    """An action payload that does not follow the schema (the message names no body content).

    What could be read of it (the action's name, its conversation and message ids) is
    kept, so the router can refuse it with the reason and tell the agent.
    """

    def __init__(
        self, reason: str, *, action: str = "", conversation_id: str = "", message_id: str = ""
    ) -> None:
        super().__init__(reason)
        self.action = action
        self.conversation_id = conversation_id
        self.message_id = message_id

    def as_action(self, agent_id: str) -> AgentAction:
        """Return the refused action for the router (never applied: it carries the reason)."""
        return AgentAction(
            agent_id=agent_id,
            action=self.action[:64] or "unknown",
            conversation_id=self.conversation_id[:64],
            message_id=self.message_id[:64],
            refused=str(self),
        )


def parse_action(agent_id: str, payload: Any, *, max_bytes: int = 65536) -> AgentAction:
    """Validate one action payload sent by agent_id and return it as an AgentAction.

    agent_id comes from the transport's authenticated identity (the topic the broker's
    ACL binds to the agent's login, the signed webhook, ...), never from the body.
    """
    if not isinstance(payload, bytes | bytearray):
        raise ActionError("payload is not bytes")
    if len(payload) > max_bytes:
        raise ActionError(f"payload larger than {max_bytes} bytes")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ActionError("payload is not UTF-8 JSON") from None
    if not isinstance(data, dict):
        raise ActionError("payload is not a JSON object")
    raw = data.get("action")
    seen = {
        k: v
        for k in ("conversation_id", "message_id")
        if isinstance(v := data.get(k), str) and len(v) <= 64
    }
    name = raw if isinstance(raw, str) else ""

    def error(reason: str) -> ActionError:
        return ActionError(reason, action=name, **seen)

    if not isinstance(raw, str) or raw not in ACTIONS:
        raise error(f"action must be one of {sorted(ACTIONS)}")
    action = raw
    if "agent_id" in data and data["agent_id"] != agent_id:
        raise error("agent_id in the body does not match the sender")
    fields: dict[str, str] = {}
    for key in _ACTION_FIELDS:
        value = data.get(key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise error(f"{key} must be a string")
        fields[key] = value
    if action in (Action.ACCEPT, Action.RESOLVE, Action.TRANSFER) and not (
        fields["conversation_id"] or fields["message_id"]
    ):
        raise error(f"{action} needs conversation_id or message_id")
    if action == Action.REPLY and not (fields["conversation_id"] and fields["value"]):
        raise error("reply needs conversation_id and a non-empty value")
    if action == Action.PRESENCE and fields["value"] not in tuple(Presence):
        raise error('presence needs value "on", "away" or "off"')
    if action == Action.RELABEL and not (fields["message_id"] and fields["value"] in LABELS):
        raise error(f"relabel needs message_id and one of {'/'.join(LABELS)}")
    target_kind, _, target = fields["value"].partition(":")
    if action == Action.TRANSFER and (target_kind not in ("agent", "queue") or not target):
        raise error("transfer needs value agent:<agent id> or queue:<queue name>")
    extra = {k: v for k, v in data.items() if k not in ("action", "agent_id", *_ACTION_FIELDS)}
    return AgentAction(
        agent_id=agent_id,
        action=action,
        conversation_id=fields["conversation_id"],
        message_id=fields["message_id"],
        value=fields["value"],
        extra=extra,
    )
