"""MQTT agent tool: deliveries to `{prefix}/{agent}/inbox`, actions from `{prefix}/+/actions`.

Presence (with `presence = true`): agents' tools publish `on`, `away` or `off` (or JSON
`{"state": "on"}`) *retained* to `{prefix}/{agent}/presence` and set the same topic with
`off` as their connection's last will, so a tool that drops off the network is taken
off line by the broker's will and its offers go back to the queue; the retained state
is read again on every reconnect. The router announces itself the same way: retained
`{prefix}/_router/status` is `online` while it is connected and `offline` (its last
will, or published on a clean stop) otherwise, so agents' tools can show it.
`config/mosquitto/omnirouter.acl` binds each topic to its agent's login: an agent
reads only its own inbox and acts and reports presence only as itself.

Several router instances on one store (same config, same broker) must apply each
action once: a reply relayed three times reaches the customer three times. So the
action filter is subscribed as an MQTT shared subscription,
`$share/{share_group}/{prefix}/+/actions` (MQTT 5, and Mosquitto ≥ 1.6 for the 3.1.1
clients aiomqtt makes by default): the broker hands each action to one subscriber of
the group. Actions are never retained, so nothing is lost by shared subscriptions not
receiving retained messages. Presence stays a plain subscription on every instance:
its retained states must be read again on every reconnect (which a shared subscription
does not promise), and applying the same state on each instance sets it again (see
`_session_once`).

One connection per tool, kept alive by `run()`: aiomqtt has no automatic reconnect,
so `run()` reconnects itself with capped exponential backoff and full jitter, and
parks at the maximum delay when the broker refuses the credentials.

`deliver()` publishes with QoS 1 and returns only after the broker's PUBACK. Many
deliveries may be in flight at once on the one connection; that is the fast path.
Two things aiomqtt does not do for us, handled here:

* A publish waiting for its PUBACK is not woken when the connection drops (paho
  never calls on_publish for it); aiomqtt only gives up at its timeout. Each
  publish therefore waits under a deadline that the connection registers, and
  `run()` expires every registered deadline when the connection ends, so in-flight
  deliveries fail at once.
* paho keeps unacknowledged messages in its client and re-sends them after a
  reconnect of the *same* client. We build a fresh client per connection, so a
  delivery that failed here is re-sent only by the outbox, with its own id.
* A broker that hangs (a stuck process, a black-holed route) keeps its TCP connection
  open; paho notices only after one to two keepalive periods, and until then every
  publish times out and spends one of the outbox's attempts: a hang of a minute could
  dead-letter a backlog. So when a publish gets no PUBACK within `publish_timeout` and
  *no* publish on the connection was acknowledged for that long either, the broker is
  taken as unresponsive: the connection is dropped and the tool goes to
  `transient_disconnect` at once, so the outbox holds its items without spending
  attempts while `run()` reconnects. (A slow but working broker still acknowledges
  other publishes, so a single late PUBACK does not drop the connection.)

Delivery is at least once: a PUBACK lost with the connection makes the outbox send
the same delivery id again. Receivers dedupe on `delivery_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from router.actions import ActionError, parse_action
from router.backoff import backoff_delay
from router.delivery import encode_delivery
from router.drivers import (
    AGENT_ID_RE,
    NAME_RE,
    ActionSink,
    AgentAction,
    AgentToolBase,
    Delivery,
    DriverContext,
    DriverState,
    PermanentError,
    Presence,
    TimedOut,
    TransientError,
)

__all__ = ["ActionError", "MqttConfig", "MqttTool", "parse_action"]

# CONNACK codes meaning "these credentials will not work": v3.1.1 return codes 4
# (bad user name or password) and 5 (not authorised), and their MQTT v5 / paho 2
# reason codes 134 and 135. paho 2 reports v3.1.1 refusals as the v5 codes.
AUTH_REFUSED_CODES = frozenset({4, 5, 134, 135})

_AGENT_ID = re.compile(AGENT_ID_RE)
# A topic segment of an address: anything but the separator, wildcards and NUL.
_ADDRESS = re.compile(r"[^/+#\x00]+(?:/[^/+#\x00]+)*")
# The topic segment of the router's own status; agent ids start with a letter or digit.
ROUTER_SEGMENT = "_router"
_PREFIX_RE = r"^[^/+#\x00]+(?:/[^/+#\x00]+)*$"  # anchored: pydantic patterns search
# A share name is one topic level with no wildcard (MQTT 5 §4.8.2); `$` is refused too
# so it cannot be mistaken for a system topic.
_SHARE_GROUP_RE = r"^(?:[^/+#$\x00]+)?$"


class MqttConfig(BaseModel):
    """Settings of one MQTT adapter."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["mqtt"]
    name: str = Field(pattern=NAME_RE)
    host: str = Field(default="localhost", min_length=1, max_length=253)
    port: int = Field(default=1883, ge=1, le=65535)
    username: str | None = Field(default=None, min_length=1, max_length=256)
    password: SecretStr | None = None
    # Empty: "omnirouter-<name>-<host>-<pid>", unique per running instance: a broker
    # drops the older of two clients with one id, so two daemons sharing a default id
    # would knock each other off line. Sessions are clean, so nothing is lost by a new id.
    client_id: str = Field(default="", max_length=128)
    topic_prefix: str = Field(
        default="omnirouter/agents", min_length=1, max_length=256, pattern=_PREFIX_RE
    )
    qos: Literal[1] = 1  # QoS 1 is the contract: PUBACK before success; fixed on purpose
    tls: bool = False
    ca_file: Path | None = None  # with tls: trust this CA instead of the system store
    keepalive: int = Field(default=30, ge=5, le=3600)
    connect_timeout: float = Field(default=10.0, gt=0, le=120)
    publish_timeout: float = Field(default=10.0, gt=0, le=300)
    reconnect_min: float = Field(default=0.5, gt=0, le=60)  # first reconnect delay ceiling, seconds
    reconnect_max: float = Field(
        default=30.0, gt=0, le=3600
    )  # delay cap; also the bad-credentials pace
    # paho's default window is 20 unacknowledged publishes; beyond it messages wait
    # in paho's queue, which caps throughput at 20/RTT on a distant broker. 256
    # matches the outbox's default concurrency.
    max_inflight: int = Field(default=256, ge=1, le=65535)
    max_action_bytes: int = Field(default=65536, ge=256, le=1 << 20)
    # Follow agents' retained presence (and last wills) on {prefix}/<agent>/presence.
    presence: bool = False
    # Keep retained {prefix}/_router/status: online while connected, offline as last will.
    router_status: bool = True
    # Subscribe to actions as $share/<share_group>/...: several instances on one store
    # then get each action once. "" subscribes plainly (a broker without $share).
    share_group: str = Field(default="omnirouter", max_length=128, pattern=_SHARE_GROUP_RE)

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        """Fill the default client id and reject settings that contradict each other."""
        if not self.client_id:
            # Frozen model: the documented way to set a derived default is object.__setattr__.
            host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40]
            object.__setattr__(self, "client_id", f"omnirouter-{self.name}-{host}-{os.getpid()}")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        if self.ca_file is not None and not self.tls:
            raise ValueError("ca_file needs tls = true")
        if self.password is not None and self.username is None:
            raise ValueError("password needs a username")
        return self


@dataclass(slots=True)
class _Session:
    """One live connection: the client and a future resolved when the connection ends."""

    client: aiomqtt.Client
    lost: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # The deadlines of deliveries waiting for their PUBACK; end() expires them at once.
    waiting: set[asyncio.Timeout] = field(default_factory=set)
    offline_sent: bool = False  # the retained "offline" status went out (a clean stop)
    # When the broker last acknowledged something on this connection (time.monotonic()).
    last_ack: float = field(default_factory=time.monotonic)
    # Resolved with a reason when deliveries show the broker stopped answering.
    unresponsive: asyncio.Future[str] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def end(self) -> None:
        """Mark the connection as gone and wake every delivery still waiting for a PUBACK."""
        if not self.lost.done():
            self.lost.set_result(None)
        for deadline in list(self.waiting):
            if not deadline.expired():
                deadline.reschedule(0)  # in the past: expires on the loop's next iteration


class MqttTool(AgentToolBase):
    """Publish deliveries with QoS 1 and feed agent actions from the broker to the router."""

    config_model: ClassVar[type[MqttConfig]] = MqttConfig
    sends_actions = True  # agents publish accept/resolve/reply/... on <prefix>/<agent>/actions

    def __init__(self, name: str, config: MqttConfig, ctx: DriverContext) -> None:
        """Prepare the tool; the connection is made by run()."""
        super().__init__(name, ctx)
        self.config = config
        self.sleep: Callable[[float], Any] = asyncio.sleep  # injectable for tests
        self._session: _Session | None = None
        self._conn_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._tls_context: ssl.SSLContext | None = None
        self._late_exits: set[asyncio.Task[None]] = set()
        prefix = config.topic_prefix
        self._actions_filter = f"{prefix}/+/actions"
        if config.share_group:
            # Alone, an instance gets every action through the shared subscription too.
            self._actions_filter = f"$share/{config.share_group}/{self._actions_filter}"
        self._presence_filter = f"{prefix}/+/presence"
        self.status_topic = f"{prefix}/{ROUTER_SEGMENT}/status"
        self._prefix_len = len(prefix) + 1

    # -- lifecycle -------------------------------------------------------------

    async def run(self, actions: ActionSink) -> None:
        """Keep a connection to the broker and feed agent actions to `actions` until cancelled."""
        if not self._stopping:
            if self.config.tls:
                # Loading a CA bundle reads files: keep it off the event loop.
                try:
                    self._tls_context = await asyncio.to_thread(_tls_context, self.config.ca_file)
                except (OSError, ssl.SSLError) as exc:
                    self.last_error = f"cannot load TLS CA file: {exc}"
                    self.log.error("mqtt.tls_setup_failed", error=str(exc))
                    raise PermanentError(self.last_error) from exc
            task = asyncio.create_task(self._connection_loop(actions), name=f"mqtt-{self.name}")
            self._conn_task = task
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we were cancelled: awaiting the task already let it disconnect
                # stop() ended the connection on purpose; park below until cancelled.
        await asyncio.Event().wait()

    async def stop(self) -> None:
        """Disconnect from the broker; deliveries not yet acknowledged stay in the outbox."""
        self._stopping = True
        if self._session is not None:
            await self._announce_offline(self._session)
        task = self._conn_task
        if task is not None and not task.done():
            task.cancel()
            # aiomqtt bounds its graceful DISCONNECT by its own timeout; add a margin.
            await asyncio.wait([task], timeout=self.config.connect_timeout + 1)
        if self._late_exits:
            await asyncio.wait(self._late_exits, timeout=self.config.connect_timeout + 1)
        self._set_state(DriverState.STOPPED)

    # -- connection ------------------------------------------------------------

    async def _connection_loop(self, actions: ActionSink) -> None:
        """Connect, listen, and reconnect with backoff; hand actions to a worker in order."""
        queue: asyncio.Queue[AgentAction] = asyncio.Queue()
        # The reader only queues: a slow ActionSink must not delay noticing a lost
        # connection (deliveries waiting for a PUBACK are woken by that).
        worker = asyncio.create_task(
            self._action_worker(queue, actions), name=f"mqtt-{self.name}-actions"
        )
        try:
            await self._reconnect_forever(queue)
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def _reconnect_forever(self, queue: asyncio.Queue[AgentAction]) -> None:
        """Run sessions one after another, backing off between them."""
        failures = 0  # consecutive failed attempts, drives the backoff
        if self.state in (DriverState.STOPPED, DriverState.CONNECTED):
            self._set_state(DriverState.CONNECTING)
        while True:
            try:
                await self._session_once(queue)
                raise aiomqtt.MqttError("message stream ended")  # not expected: treat as a loss
            except asyncio.CancelledError:
                raise
            except MqttConnectError as exc:
                if _connect_code(exc) in AUTH_REFUSED_CODES:
                    # Retrying at speed would only hammer the broker (and may lock the
                    # account): park at the maximum delay, log once via the transition.
                    self._set_state(
                        DriverState.BAD_CREDENTIALS, f"broker refused the credentials: {exc}"
                    )
                    delay = self.config.reconnect_max
                else:
                    delay = self._transient(failures, f"broker refused the connection: {exc}")
                    failures += 1
            except aiomqtt.MqttError as exc:
                if self.state == DriverState.CONNECTED or isinstance(exc, _Unresponsive):
                    failures = 0  # the connection worked: start the backoff from the bottom
                delay = self._transient(failures, f"connection failed or lost: {exc}")
                failures += 1
            except Exception as exc:  # a bug or an unmapped library error must not end the loop
                if self.state == DriverState.CONNECTED:
                    failures = 0
                self.log.exception("mqtt.unexpected_error", error_type=type(exc).__name__)
                delay = self._transient(failures, f"unexpected {type(exc).__name__}: {exc}")
                failures += 1
            await self.sleep(delay)

    def _transient(self, failures: int, error: str) -> float:
        """Mark the connection as down (unless parked on credentials) and return the backoff."""
        if self.state != DriverState.BAD_CREDENTIALS:
            self._set_state(DriverState.TRANSIENT_DISCONNECT, error)
        else:
            self.last_error = error
        return backoff_delay(failures, self.config.reconnect_min, self.config.reconnect_max)

    async def _session_once(self, queue: asyncio.Queue[AgentAction]) -> None:
        """Run one connection from connect to loss; raises MqttError when it ends."""
        client = self._new_client()
        await self._enter(client)
        session = _Session(client)
        try:
            self._session = session
            await client.subscribe(self._actions_filter, qos=1)
            if self.config.presence:
                # Retained states arrive at once: who is on line while we were away.
                # Not shared (see the module doc): a shared subscription need not get
                # retained messages, and a missed "off" would leave an agent that
                # dropped off holding its offers; another instance applying the same
                # state again only sets it again.
                await client.subscribe(self._presence_filter, qos=1)
            if self.config.router_status:
                await client.publish(
                    self.status_topic, _status_payload("online"), qos=1, retain=True
                )
            session.last_ack = time.monotonic()
            self._set_state(DriverState.CONNECTED)
            reader = asyncio.create_task(self._read_actions(client, queue))
            try:
                await asyncio.wait(
                    (reader, session.unresponsive), return_when=asyncio.FIRST_COMPLETED
                )
                if reader.done():
                    reader.result()  # the connection ended: raise why (an MqttError)
            finally:
                if not reader.done():
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
            # The broker stopped answering: report it now, before the DISCONNECT (which a
            # hung broker may never acknowledge) is given up on, so the outbox holds items.
            reason = session.unresponsive.result()
            self._set_state(DriverState.TRANSIENT_DISCONNECT, reason)
            raise _Unresponsive(reason)
        except asyncio.CancelledError:
            # A clean stop sends no last will: say "offline" before disconnecting.
            await self._announce_offline(session)
            raise
        finally:
            self._session = None
            session.end()  # wake deliveries still waiting for a PUBACK
            # Graceful DISCONNECT when still connected; a no-op after a lost connection.
            await client.__aexit__(None, None, None)

    async def _read_actions(
        self, client: aiomqtt.Client, queue: asyncio.Queue[AgentAction]
    ) -> None:
        """Queue the actions arriving on the connection until it ends."""
        async for message in client.messages:
            action = self._parse_message(message)
            if action is not None:
                queue.put_nowait(action)

    async def _enter(self, client: aiomqtt.Client) -> None:
        """Connect the client; if cancelled meanwhile, close the connection once it is up."""
        # aiomqtt connects in an executor thread that cancellation cannot stop; a
        # connection finishing after we gave up would linger with our client id and
        # later kick out the next one. Shield it and clean up behind it instead.
        enter = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(enter)
        except asyncio.CancelledError:
            enter.add_done_callback(self._close_late_connection)
            raise

    def _close_late_connection(self, enter: asyncio.Future[Any]) -> None:
        """Disconnect a client whose connect finished after its caller was cancelled."""
        if enter.cancelled() or enter.exception() is not None:
            return
        client = enter.result()
        task = asyncio.get_running_loop().create_task(client.__aexit__(None, None, None))
        self._late_exits.add(task)
        task.add_done_callback(self._late_exits.discard)

    def _new_client(self) -> aiomqtt.Client:
        """Build a fresh aiomqtt client (fresh paho state: no re-sends from a past connection)."""
        cfg = self.config
        client = aiomqtt.Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password.get_secret_value() if cfg.password is not None else None,
            identifier=cfg.client_id,
            keepalive=cfg.keepalive,
            timeout=cfg.connect_timeout,
            tls_context=self._tls_context,
            max_inflight_messages=cfg.max_inflight,
            will=(
                aiomqtt.Will(self.status_topic, _status_payload("offline"), qos=1, retain=True)
                if cfg.router_status
                else None
            ),
        )
        # aiomqtt logs a warning on *every* call while more than 10 are pending;
        # many in-flight deliveries are our normal case (paho queues past
        # max_inflight), so only the 16-bit message id space is a real limit.
        client.pending_calls_threshold = 65535
        return client

    # -- actions ---------------------------------------------------------------

    def _parse_message(self, message: aiomqtt.Message) -> AgentAction | None:
        """Return the action a message carries, or log why it was dropped and return None."""
        topic = message.topic.value
        if topic.endswith("/presence"):
            return self._parse_presence(topic, message.payload)
        agent_id = topic[self._prefix_len : -len("/actions")]
        size = len(message.payload) if isinstance(message.payload, bytes | bytearray) else 0
        if not _AGENT_ID.fullmatch(agent_id):
            self.log.warning(
                "mqtt.action_rejected", reason="agent id in topic is not valid", size=size
            )
            return None
        try:
            return parse_action(agent_id, message.payload, max_bytes=self.config.max_action_bytes)
        except ActionError as exc:
            # Only our own reason and the size: the body may hold customer data.
            self.log.warning("mqtt.action_rejected", agent_id=agent_id, reason=str(exc), size=size)
            # The router refuses it too, so the agent's tool hears why (a `notice`).
            return exc.as_action(agent_id)

    def _parse_presence(self, topic: str, payload: Any) -> AgentAction | None:
        """Return the presence action a (retained) presence message carries, or None."""
        agent_id = topic[self._prefix_len : -len("/presence")]
        if not _AGENT_ID.fullmatch(agent_id):
            self.log.warning("mqtt.presence_rejected", reason="agent id in topic is not valid")
            return None
        if not payload:
            return None  # a cleared retained message says nothing
        state = presence_from_payload(payload)
        if state is None:
            size = len(payload) if isinstance(payload, bytes | bytearray) else 0
            self.log.warning(
                "mqtt.presence_rejected", agent_id=agent_id, reason="unknown state", size=size
            )
            return None
        return AgentAction(agent_id=agent_id, action="presence", value=state)

    async def _announce_offline(self, session: _Session) -> None:
        """Publish the retained `offline` status before a clean disconnect (no will then)."""
        if session.offline_sent or not self.config.router_status or session.lost.done():
            return
        session.offline_sent = True
        try:
            async with asyncio.timeout(min(2.0, self.config.publish_timeout)):
                await session.client.publish(
                    self.status_topic, _status_payload("offline"), qos=1, retain=True
                )
        except (TimeoutError, aiomqtt.MqttError) as exc:
            self.log.warning("mqtt.status_not_published", error=type(exc).__name__)

    async def _action_worker(self, queue: asyncio.Queue[AgentAction], actions: ActionSink) -> None:
        """Hand queued actions to the router one at a time, in arrival order."""
        while True:
            action = await queue.get()
            try:
                await actions(action)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the router failed on one action; keep going with the next
                self.log.error(
                    "mqtt.action_failed",
                    agent_id=action.agent_id,
                    action=action.action,
                    error_type=type(exc).__name__,
                )

    # -- deliveries ------------------------------------------------------------

    async def deliver(self, delivery: Delivery) -> None:
        """Publish the delivery with QoS 1 and return after the broker's PUBACK."""
        session = self._session
        if session is None or self._stopping:
            raise TransientError(f"mqtt {self.name}: not connected to the broker ({self.state})")
        address = delivery.address or delivery.agent_id
        if not _ADDRESS.fullmatch(address) or len(address) > 512:
            raise PermanentError(f"mqtt: address {address[:80]!r} is not a valid topic segment")
        topic = f"{self.config.topic_prefix}/{address}/inbox"
        body = encode_delivery(delivery)
        if session.lost.done():
            raise TransientError(f"mqtt {self.name}: connection lost before the PUBACK")
        # The publish runs in this task, under a deadline that session.end() expires when
        # the connection drops: no extra task, waiter future or callbacks per delivery.
        # Expiry cancels the publish, which frees aiomqtt's pending-call slot (paho may
        # still send the message; a resend carries the same delivery id).
        deadline = asyncio.timeout(self.config.publish_timeout)
        try:
            async with deadline:
                session.waiting.add(deadline)
                try:
                    await session.client.publish(topic, body, qos=1, timeout=math.inf)
                finally:
                    session.waiting.discard(deadline)
        except TimeoutError as exc:
            if not deadline.expired():  # not our deadline: the library's own error
                raise _translate(exc) from exc
            if session.lost.done():
                raise TransientError(
                    f"mqtt {self.name}: connection lost before the PUBACK"
                ) from None
            error = f"mqtt {self.name}: no PUBACK within {self.config.publish_timeout} s"
            silent = time.monotonic() - session.last_ack
            if silent >= self.config.publish_timeout and not session.unresponsive.done():
                # Nothing at all acknowledged for that long: the broker hangs (see the
                # module doc); drop the connection rather than spend attempts on it.
                session.unresponsive.set_result(
                    f"broker unresponsive: no PUBACK for {silent:.1f} s"
                )
            raise TimedOut(error) from None
        except Exception as exc:
            raise _translate(exc) from exc
        session.last_ack = time.monotonic()
        self._succeeded()

    # -- helpers ---------------------------------------------------------------


_PRESENCE_WORDS = {
    "on": Presence.ON,
    "online": Presence.ON,
    "available": Presence.ON,
    "away": Presence.AWAY,
    "busy": Presence.AWAY,
    "off": Presence.OFF,
    "offline": Presence.OFF,
}


def presence_from_payload(payload: Any) -> str | None:
    """Return on/away/off from a presence message: a word, or JSON {"state": word}."""
    if not isinstance(payload, bytes | bytearray) or len(payload) > 1024:
        return None
    try:
        text = bytes(payload).decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return None
        value = data.get("state", data.get("presence")) if isinstance(data, dict) else None
        text = value if isinstance(value, str) else ""
    state = _PRESENCE_WORDS.get(text.strip().strip('"').lower())
    return str(state) if state is not None else None


def _status_payload(status: str) -> bytes:
    return json.dumps({"status": status, "router": socket.gethostname()}).encode()


class _Unresponsive(aiomqtt.MqttError):
    """The connection is up but the broker acknowledges nothing: reconnect."""


def _connect_code(exc: MqttConnectError) -> int | None:
    """Return the numeric CONNACK code of a refused connection."""
    rc = exc.rc
    if isinstance(rc, ReasonCode):
        return int(rc.value)
    return rc


def _translate(exc: BaseException) -> Exception:
    """Map an error from a publish into the driver taxonomy (the one place that does)."""
    if isinstance(exc, aiomqtt.MqttError):
        return TransientError(f"mqtt publish failed: {exc}")
    # e.g. paho's RuntimeError when 65535 message ids are pending: back off and retry.
    return TransientError(f"mqtt publish failed: {type(exc).__name__}: {exc}")


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSLSocket that closes itself when its handshake fails.

    paho's _ssl_wrap_socket drops the socket without closing it when do_handshake()
    raises (e.g. an untrusted certificate), leaking one descriptor per attempt
    until garbage collection, with a ResourceWarning.
    """

    def do_handshake(self, block: bool = False) -> None:
        """Run the handshake; close the socket if it fails."""
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """Return a verifying client TLS context, trusting ca_file when given."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file is not None else None)
    context.sslsocket_class = _ClosingSSLSocket
    return context
