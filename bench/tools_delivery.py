"""Agent-tool delivery benchmark: through the outbox to MQTT and to a webhook, against bare clients.

Usage: python bench/tools_delivery.py [--deliveries N] [--rate R] [--seconds S]

Everything runs in this process on one event loop, except the private mosquitto
(tests.peers.Mosquitto): the real SQLite store (synchronous=FULL), the real outbox
`Dispatcher`, the real `MqttTool` and `WebhookTool`, an MQTT subscriber and a local
aiohttp receiver that checks each webhook's signature.

Phase 1, throughput: N assignment deliveries of the same body
- baseline MQTT: one bare aiomqtt client publishes the N encoded bodies with QoS 1,
  256 in flight (the adapter's default window), until every PUBACK;
- outbox MQTT: N items committed to the outbox in one transaction, submitted to the
  dispatcher, counted when the dispatcher has every PUBACK and the subscriber has them;
- the same pair for the webhook: a bare aiohttp client POSTs the bodies (100 at once,
  the adapter's connection limit), then the outbox and `WebhookTool`.
Each outbox figure is reported as a ratio to its bare baseline.

Phase 2, latency: an open loop at R deliveries/s for S seconds per tool; each delivery
is committed to the outbox alone (one transaction, as an assignment commits with its
message) and submitted; latency runs from the scheduled commit to the message arriving
at the subscriber or the receiver. p50/p99/max and lost are reported.

Prints a table, then one JSON line with every figure. Exit code 0 after a completed
run, 1 when the bench itself could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests` (peers, payloads) lives at the repo root

import aiohttp  # noqa: E402
import aiomqtt  # noqa: E402
import structlog  # noqa: E402
from aiohttp import web  # noqa: E402

from adapters.mqtt import MqttConfig, MqttTool  # noqa: E402
from adapters.webhook import WebhookConfig, WebhookTool, verify_signature  # noqa: E402
from router.config import OutboxConfig  # noqa: E402
from router.delivery import ToolTarget, encode_delivery  # noqa: E402
from router.drivers import AgentAction, Delivery, DriverContext, DriverState  # noqa: E402
from router.logging import configure_logging  # noqa: E402
from router.metrics import Metrics  # noqa: E402
from router.model import new_ulid  # noqa: E402
from router.outbox import Dispatcher  # noqa: E402
from router.store import OutboxItem  # noqa: E402
from router.store.sqlite import SqliteStore  # noqa: E402
from tests import payloads  # noqa: E402
from tests.peers import Mosquitto, wait_until  # noqa: E402

PREFIX = "bench/agents"
SECRET = "bench-webhook-secret-0123456789"
AGENTS = [f"agent{i:02d}" for i in range(20)]


class Arrivals:
    """Stamps each arriving delivery by its id; lets the bench await a count."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.bad = 0
        self._want = 0
        self._enough = asyncio.Event()

    def arrived(self, delivery_id: str) -> None:
        self.at.setdefault(delivery_id, time.perf_counter())
        if self._want and len(self.at) >= self._want:
            self._enough.set()

    async def wait_for(self, count: int, timeout: float) -> bool:
        self._want = count
        if len(self.at) >= count:
            return True
        self._enough.clear()
        try:
            await asyncio.wait_for(self._enough.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def reset(self) -> None:
        self.at.clear()
        self._want = 0


def delivery_id_of(body: bytes) -> str:
    value = json.loads(body).get("delivery_id", "")
    return value if isinstance(value, str) else ""


async def mqtt_listener(broker: Mosquitto, arrivals: Arrivals, ready: asyncio.Event) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier="bench-sub") as client:
        await client.subscribe(f"{PREFIX}/+/inbox", qos=1)
        ready.set()
        async for message in client.messages:
            if isinstance(message.payload, bytes):
                arrivals.arrived(delivery_id_of(message.payload))


async def webhook_receiver(arrivals: Arrivals) -> tuple[web.AppRunner, str]:
    async def inbox(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("X-Bench-Bare") != "1" and not verify_signature(
            SECRET.encode(),
            request.headers.get("X-Omnirouter-Timestamp", ""),
            body,
            request.headers.get("X-Omnirouter-Signature", ""),
        ):
            arrivals.bad += 1
            return web.Response(status=401)
        arrivals.arrived(delivery_id_of(body))
        return web.Response(status=204)

    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/agents/{agent}/inbox", inbox)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def make_item(target: str, n: int, now: float) -> OutboxItem:
    agent = AGENTS[n % len(AGENTS)]
    return OutboxItem(
        id=new_ulid(),
        target=ToolTarget(target),
        agent_id=agent,
        address=agent,
        payload=payloads.assignment(n, agent=agent, text=f"Where is my parcel {n}? 我的包裹在哪里"),
        message_id=new_ulid(),
        next_attempt_at=now,
        created_at=now,
    )


def bodies(target: str, count: int) -> list[tuple[str, bytes]]:
    out = []
    for n in range(count):
        item = make_item(target, n, time.time())
        delivery = Delivery(item.id, target, item.agent_id, item.address, item.payload)
        out.append((item.agent_id, encode_delivery(delivery)))
    return out


async def bare_mqtt(broker: Mosquitto, count: int, arrivals: Arrivals) -> float:
    """Publish count bodies with QoS 1, 256 in flight; return msgs/s until all arrived."""
    work = bodies("mq", count)
    gate = asyncio.Semaphore(256)
    async with aiomqtt.Client(
        broker.host, broker.port, identifier="bench-bare", max_inflight_messages=256
    ) as client:
        client.pending_calls_threshold = 65535

        async def one(agent: str, body: bytes) -> None:
            async with gate:
                await client.publish(f"{PREFIX}/{agent}/inbox", body, qos=1)

        arrivals.reset()
        started = time.perf_counter()
        await asyncio.gather(*(one(a, b) for a, b in work))
        await arrivals.wait_for(count, 60)
        return count / (time.perf_counter() - started)


async def bare_webhook(url: str, count: int, arrivals: Arrivals) -> float:
    """POST count bodies, 100 at once; return msgs/s until all arrived."""
    work = bodies("hook", count)
    gate = asyncio.Semaphore(100)
    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(agent: str, body: bytes) -> None:
            async with gate:
                async with session.post(
                    f"{url}/agents/{agent}/inbox",
                    data=body,
                    headers={"Content-Type": "application/json", "X-Bench-Bare": "1"},
                ) as resp:
                    await resp.read()

        arrivals.reset()
        started = time.perf_counter()
        await asyncio.gather(*(one(a, b) for a, b in work))
        await arrivals.wait_for(count, 60)
        return count / (time.perf_counter() - started)


async def through_outbox(
    store: SqliteStore, dispatcher: Dispatcher, target: str, count: int, arrivals: Arrivals
) -> float:
    """Commit count items in one transaction, submit them; msgs/s until all arrived."""
    arrivals.reset()
    started = time.perf_counter()
    now = time.time()
    items = [make_item(target, n, now) for n in range(count)]
    await store.enqueue_outbox(items)
    for item in items:
        dispatcher.submit(item)
    await arrivals.wait_for(count, 120)
    return count / (time.perf_counter() - started)


async def open_loop(
    store: SqliteStore,
    dispatcher: Dispatcher,
    target: str,
    rate: float,
    seconds: float,
    arrivals: Arrivals,
) -> dict[str, float]:
    """Commit and submit one item at a time on schedule; return latency figures in ms."""
    arrivals.reset()
    scheduled: dict[str, float] = {}
    tasks: list[asyncio.Task[None]] = []
    total = int(rate * seconds)
    origin = time.perf_counter()

    async def one(n: int, at: float) -> None:
        item = make_item(target, n, time.time())
        scheduled[item.id] = at
        await store.enqueue_outbox([item])
        dispatcher.submit(item)

    for n in range(total):
        at = origin + n / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n, at)))
    await asyncio.gather(*tasks)
    await arrivals.wait_for(total, 30)
    latencies = sorted(
        (arrivals.at[i] - at) * 1000 for i, at in scheduled.items() if i in arrivals.at
    )
    lost = total - len(latencies)

    def pct(p: float) -> float:
        if not latencies:
            return math.nan
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    return {
        "sent": total,
        "lost": lost,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else math.nan,
        "p99_ms": round(pct(99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else math.nan,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configure_logging("warning", json=True)
    log = structlog.get_logger("bench")
    tmp = Path(tempfile.mkdtemp(prefix="omnirouter-bench-tools-"))
    figures: dict[str, Any] = {"deliveries": args.deliveries, "rate": args.rate}
    # The bench subscriber must not be the bottleneck: no per-client queue or window cap.
    with Mosquitto(extra_config="max_queued_messages 0\nmax_inflight_messages 0") as broker:
        mqtt_arrivals, hook_arrivals = Arrivals(), Arrivals()
        ready = asyncio.Event()
        listener = asyncio.create_task(mqtt_listener(broker, mqtt_arrivals, ready))
        await asyncio.wait_for(ready.wait(), 10)
        runner, url = await webhook_receiver(hook_arrivals)
        ctx = DriverContext(state_dir=tmp, log=log)
        mqtt = MqttTool(
            "mq",
            MqttConfig(
                type="mqtt", name="mq", host=broker.host, port=broker.port, topic_prefix=PREFIX
            ),
            ctx,
        )
        hook = WebhookTool(
            "hook",
            WebhookConfig(
                type="webhook", name="hook", url=url + "/agents/{agent_id}/inbox", secret=SECRET
            ),
            ctx,
        )
        store = SqliteStore(tmp / "bench.db")
        await store.open()
        tools = {"mq": mqtt, "hook": hook}
        dispatcher = Dispatcher(store, lambda: tools, OutboxConfig(), Metrics())

        async def ignore(action: AgentAction) -> None:
            return None

        runs = [asyncio.create_task(t.run(ignore)) for t in tools.values()]
        sender = asyncio.create_task(dispatcher.run())
        try:
            await wait_until(lambda: mqtt.state == DriverState.CONNECTED, 10)
            n = args.deliveries
            # Warm both paths (connections, caches) before measuring.
            await through_outbox(store, dispatcher, "mq", 200, mqtt_arrivals)
            await through_outbox(store, dispatcher, "hook", 200, hook_arrivals)
            base_mq = await bare_mqtt(broker, n, mqtt_arrivals)
            out_mq = await through_outbox(store, dispatcher, "mq", n, mqtt_arrivals)
            base_hook = await bare_webhook(url, n, hook_arrivals)
            out_hook = await through_outbox(store, dispatcher, "hook", n, hook_arrivals)
            figures.update(
                mqtt_bare_per_s=round(base_mq),
                mqtt_outbox_per_s=round(out_mq),
                mqtt_ratio=round(out_mq / base_mq, 3),
                webhook_bare_per_s=round(base_hook),
                webhook_outbox_per_s=round(out_hook),
                webhook_ratio=round(out_hook / base_hook, 3),
            )
            for name, target, arrivals in (
                ("mqtt", "mq", mqtt_arrivals),
                ("webhook", "hook", hook_arrivals),
            ):
                lat = await open_loop(store, dispatcher, target, args.rate, args.seconds, arrivals)
                figures.update({f"{name}_{k}": v for k, v in lat.items()})
            figures["webhook_bad_signatures"] = hook_arrivals.bad
            await dispatcher.drain(10)
            figures["dead_letters"] = len(await store.dead_letters(1000))
        finally:
            sender.cancel()
            for task in runs:
                task.cancel()
            await asyncio.gather(sender, *runs, return_exceptions=True)
            for t in tools.values():
                await t.stop()
            await store.close()
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await runner.cleanup()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=int, default=5000)
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop deliveries/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="open-loop duration per tool")
    args = parser.parse_args()
    try:
        f = asyncio.run(run(args))
    except Exception as exc:  # the bench could not run: say why
        print(f"bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{'path':28} {'per s':>9} {'ratio':>7}")
    print(f"{'MQTT bare client':28} {f['mqtt_bare_per_s']:>9}")
    print(f"{'MQTT through the outbox':28} {f['mqtt_outbox_per_s']:>9} {f['mqtt_ratio']:>7}")
    print(f"{'webhook bare client':28} {f['webhook_bare_per_s']:>9}")
    print(
        f"{'webhook through the outbox':28} {f['webhook_outbox_per_s']:>9} {f['webhook_ratio']:>7}"
    )
    print()
    print(f"latency at {args.rate:g}/s, commit -> arrival:  p50 / p99 / max ms, lost")
    for name in ("mqtt", "webhook"):
        print(
            f"  {name:8} {f[f'{name}_p50_ms']} / {f[f'{name}_p99_ms']} / {f[f'{name}_max_ms']}, "
            f"{f[f'{name}_lost']} lost"
        )
    print(json.dumps(f))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
