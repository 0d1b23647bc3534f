"""router/classify_workers.py: the classifier in worker processes, same verdicts, nothing lost."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import router.config as config_module
from router.classify_workers import SHARE_MIN_MESSAGES, ClassifierSpec, ClassifierWorkers
from router.config import ClassifierConfig, ConfigError, loads_config
from router.model import Classification
from tests.daemon_harness import DaemonProcess, base_config, http, ports
from tests.test_pipeline import Harness, make_config, msg

TEXTS = [
    "Hi, I was charged twice for order 88213 this morning, please refund one.",
    "How do I change the delivery address on my account?",
    "我的订单已经一个星期了还没有发货，请问什么时候能到？",
    "URGENT: our whole team cannot log in since 9am, production is down!",
    "你好，我想取消会员自动续费，怎么操作？",
    "It would be great if the app had a dark mode.",
    "I will sue you if the 9,000 EUR are not back by Friday",
    "",
]
SPEC = ClassifierSpec(
    model="intent", amount_threshold=5000.0, vip_contacts=frozenset({"vip@x"}), model_path=None
)


async def classify_all(workers: ClassifierWorkers, n: int) -> list[Classification]:
    return await asyncio.gather(
        *(
            workers.classify(
                f"{TEXTS[i % len(TEXTS)]} #{i}", subject="", contact="vip@x" if i % 5 else ""
            )
            for i in range(n)
        )
    )


def expected(n: int) -> list[Classification]:
    local = SPEC.build()
    return [
        local.classify(
            f"{TEXTS[i % len(TEXTS)]} #{i}", subject="", contact="vip@x" if i % 5 else ""
        )
        for i in range(n)
    ]


async def test_workers_give_the_loops_verdicts_bit_for_bit() -> None:
    workers = ClassifierWorkers(SPEC, 2, SPEC.build())
    await workers.start()
    try:
        assert await workers.wait_ready()
        got = await classify_all(workers, 300)
        assert got == expected(300)
        assert workers.alive == 2 and workers.fallbacks == 0
    finally:
        await workers.close()
    assert workers.alive == 0


async def test_a_killed_worker_loses_nothing_and_is_started_again() -> None:
    now = [0.0]
    counted: list[int] = []
    workers = ClassifierWorkers(
        SPEC, 1, SPEC.build(), clock=lambda: now[0], on_fallback=counted.append
    )
    await workers.start()
    try:
        assert await workers.wait_ready()  # the worker is up and answering
        os.kill(workers._workers[0].process.pid, signal.SIGKILL)
        got = await classify_all(workers, 40)
        assert got == expected(40)
        assert workers.alive == 0 and workers.fallbacks > 0  # classified in the loop meanwhile
        assert sum(counted) == workers.fallbacks  # what the metric counts
        now[0] += 61.0  # past the restart backoff
        again = await classify_all(workers, 10)
        assert again == expected(10) and workers.alive == 1
    finally:
        await workers.close()


async def test_a_hung_worker_gives_its_batch_back() -> None:
    workers = ClassifierWorkers(SPEC, 1, SPEC.build(), batch_timeout=0.5)
    await workers.start()
    try:
        assert await workers.wait_ready()
        await classify_all(workers, 3)
        pid = workers._workers[0].process.pid
        os.kill(pid, signal.SIGSTOP)  # alive, never answers
        got = await asyncio.wait_for(classify_all(workers, 12), 10)
        assert got == expected(12) and workers.fallbacks >= 12
        with pytest.raises(ProcessLookupError):  # the hung worker was killed
            os.kill(pid, 0)
    finally:
        await workers.close()


async def test_the_pipeline_routes_through_workers_and_stops_them(tmp_path: Path) -> None:
    h = Harness(
        tmp_path,
        [{"id": "alice", "capacity": 5, "skills": ["en", "zh"]}],
        classifier={"workers": 1},
    )
    pipeline = await h.start()
    workers = pipeline.core.classifier_workers
    assert workers is not None and workers.alive == 1
    assert await workers.wait_ready()
    receipt = await pipeline.ingest(msg("My parcel never arrived, I want a refund!", "dana"))
    await h.settle()
    assert [d.payload["classification"]["label"] for d in h.tool.deliveries] == ["complaint"]
    assert receipt.state == "assigned" and workers.fallbacks == 0
    await pipeline.close()
    assert pipeline.core.classifier_workers is None and workers.alive == 0
    await h.stop()


async def test_a_reload_resizes_or_removes_the_workers(tmp_path: Path) -> None:
    roster = [{"id": "alice", "capacity": 5, "skills": ["en", "zh"]}]
    h = Harness(tmp_path, roster, classifier={"workers": 1})
    pipeline = await h.start()
    first = pipeline.core.classifier_workers
    await pipeline.apply_config(make_config(tmp_path / "state", roster, classifier={"workers": 2}))
    second = pipeline.core.classifier_workers
    assert first is not None and first.alive == 0  # replaced: its processes are gone
    assert second is not None and second.alive == 2
    await pipeline.apply_config(make_config(tmp_path / "state", roster, classifier={"workers": 0}))
    assert pipeline.core.classifier_workers is None and second.alive == 0
    receipt = await pipeline.ingest(msg("Where is my order?", "dana"))
    assert receipt.state == "assigned"  # classified in the loop again
    await h.stop()


def test_the_daemon_classifies_in_a_worker_and_leaves_no_process_behind(tmp_path: Path) -> None:
    web_port, ops_port = ports()
    config = base_config(tmp_path / "state", web_port=web_port, ops_port=ops_port)
    d = DaemonProcess(tmp_path, config + "\n[classifier]\nworkers = 1\n").start()
    try:
        children = Path(f"/proc/{d.pid}/task/{d.pid}/children").read_text().split()
        commands = [Path(f"/proc/{c}/cmdline").read_bytes() for c in children]
        assert [b"router.classify_workers" in c for c in commands] == [True], commands
        status, receipt, _ = http(
            "POST",
            f"http://127.0.0.1:{web_port}/v1/messages",
            {"text": "My parcel never arrived, I want a refund!", "contact": {"handle": "d@x"}},
        )
        assert status == 201 and receipt["state"] == "assigned", receipt
        routed = d.wait_log_events("message.routed", 1)
        assert [e["label"] for e in routed] == ["complaint"]
        stop_and_check_no_worker_is_left(d, ops_port, children)
    finally:
        d.close()


def stop_and_check_no_worker_is_left(d: DaemonProcess, ops_port: int, workers: list[str]) -> None:
    """Check the gauge counts one worker, stop the daemon, and see its workers end with it."""
    _, metrics, _ = http("GET", f"http://127.0.0.1:{ops_port}/metrics")
    assert "omnirouter_classifier_workers 1.0" in metrics
    assert d.stop() == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(c) for c in workers):
        time.sleep(0.05)
    assert not [c for c in workers if _running(c)]


def _worker_children(pid: int) -> list[str]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [c for c in children if b"router.classify_workers" in _cmdline(c)]


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# The default start rate (500) is about what a loaded test machine's daemon manages at
# most: with a lower one a burst of three times as many is sure to cross it.
BURST_START_RATE = 100


def on_demand_daemon(tmp_path: Path, extra: str = "") -> tuple[DaemonProcess, str, int]:
    """Start a daemon whose worker starts at BURST_START_RATE; return it, its message
    URL and its ops port."""
    web_port, ops_port = ports()
    config = base_config(
        tmp_path / "state",
        web_port=web_port,
        ops_port=ops_port,
        extra=f"[classifier]\nworkers_start_rate = {BURST_START_RATE}\n{extra}",
    )
    return (
        DaemonProcess(tmp_path, config).start(),
        f"http://127.0.0.1:{web_port}/v1/messages",
        ops_port,
    )


def post_one(url: str, i: int) -> int:
    body = {"text": f"{TEXTS[i % 6]} #{i}", "contact": {"handle": f"burst{i}@x"}}
    return int(http("POST", url, body)[0])


def post_burst(url: str) -> None:
    """Post more than BURST_START_RATE messages within a second; each one answered 201."""
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda i: post_one(url, i), range(3 * BURST_START_RATE))) == {201}


@pytest.mark.skipif(config_module.usable_cpus() < 2, reason="auto runs no worker on one CPU")
def test_the_default_daemon_starts_its_worker_when_the_load_asks(tmp_path: Path) -> None:
    start_rate = BURST_START_RATE
    d, url, ops_port = on_demand_daemon(tmp_path)
    try:
        status, _, _ = http("POST", url, {"text": "Where is my order?", "contact": {"handle": "a"}})
        assert status == 201 and _worker_children(d.pid) == []  # a quiet daemon: one process
        post_burst(url)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not d.log_events("classifier.worker_ready"):
            time.sleep(0.05)
        assert len(d.log_events("classifier.worker_ready")) == 1
        workers = _worker_children(d.pid)
        assert len(workers) == 1
        routed = d.wait_log_events("message.routed", 1 + 3 * start_rate)
        assert len(routed) == 1 + 3 * start_rate  # every message, none twice
        stop_and_check_no_worker_is_left(d, ops_port, workers)
    finally:
        d.close()


@pytest.mark.skipif(config_module.usable_cpus() < 2, reason="auto runs no worker on one CPU")
def test_the_daemons_worker_stops_when_the_burst_is_over(tmp_path: Path) -> None:
    start_rate = BURST_START_RATE
    d, url, ops_port = on_demand_daemon(tmp_path, "workers_stop_after = 2\n")
    try:
        post_burst(url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not d.log_events("classifier.workers_stopped"):
            time.sleep(0.1)
        assert len(d.log_events("classifier.worker_ready")) == 1
        (stopped,) = d.log_events("classifier.workers_stopped")
        assert stopped["reason"] == "load fell" and stopped["workers"] == 1
        # The worker exits and is waited for: no process, not even a zombie, is left.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _worker_children(d.pid):
            time.sleep(0.05)
        assert _worker_children(d.pid) == []
        assert post_one(url, 9999) == 201  # classified in the loop again
        routed = d.wait_log_events("message.routed", 3 * start_rate + 1)
        assert len(routed) == 3 * start_rate + 1
        assert not d.log_events("classifier.worker_lost")
        deadline = time.monotonic() + 10
        gauge = ""
        while time.monotonic() < deadline and "omnirouter_classifier_workers 0.0" not in gauge:
            gauge = http("GET", f"http://127.0.0.1:{ops_port}/metrics")[1]
            time.sleep(0.2)
        assert "omnirouter_classifier_workers 0.0" in gauge
        assert d.stop() == 0
    finally:
        d.close()


def _running(pid: str) -> bool:
    """Whether a process runs (a zombie waiting for its parent's wait() does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def test_a_worker_ignores_signals_meant_for_the_daemon() -> None:
    workers = ClassifierWorkers(SPEC, 1, SPEC.build())
    await workers.start()
    try:
        assert await workers.wait_ready()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(workers._workers[0].process.pid, signum)
        assert await classify_all(workers, 20) == expected(20)
        assert workers.alive == 1 and workers.fallbacks == 0
    finally:
        await workers.close()


@pytest.mark.parametrize(("cpus", "expected_count"), [(1, 0), (2, 1), (16, 1)])
def test_auto_runs_one_worker_when_a_second_core_is_there(
    monkeypatch: pytest.MonkeyPatch, cpus: int, expected_count: int
) -> None:
    monkeypatch.setattr(config_module, "usable_cpus", lambda: cpus)
    assert ClassifierConfig().workers == "auto"  # the default
    assert ClassifierConfig().worker_count() == expected_count
    assert ClassifierConfig(workers=3).worker_count() == 3  # a number is taken as given
    assert ClassifierConfig(workers=0).worker_count() == 0


def test_usable_cpus_falls_back_to_the_machine_count(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(pid: int) -> set[int]:
        raise OSError("sched_getaffinity refused (a seccomp filter)")

    monkeypatch.setattr(config_module.os, "sched_getaffinity", refused)
    monkeypatch.setattr(config_module.os, "cpu_count", lambda: 6)
    assert config_module.usable_cpus() == 6
    monkeypatch.setattr(config_module.os, "cpu_count", lambda: None)
    assert config_module.usable_cpus() == 1


@pytest.mark.parametrize("bad", ["many", -1, 17, 1.5])
def test_a_bad_worker_count_names_the_field(bad: object) -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config(f"[classifier]\nworkers = {json.dumps(bad)}\n")
    assert "classifier.workers" in str(caught.value)


async def test_on_demand_workers_start_when_the_load_asks_and_take_over() -> None:
    now = [100.0]
    rate = 40  # [classifier] workers_start_rate
    workers = ClassifierWorkers(SPEC, 1, SPEC.build(), clock=lambda: now[0], start_rate=rate)
    await workers.start()
    try:
        # A trickle (fewer than `rate` within any second) starts no process.
        for _ in range(3):
            assert await classify_all(workers, rate - 1) == expected(rate - 1)
            now[0] += 1.0
        assert workers.alive == 0 and workers.ready == 0
        # A second holding `rate` messages starts the worker; meanwhile the loop goes
        # on classifying, nothing waits for the model to load.
        assert await classify_all(workers, rate) == expected(rate)
        assert workers.alive == 1
        assert await workers.wait_ready()
        pid = workers._workers[0].process.pid
        assert await classify_all(workers, 50) == expected(50)
        assert workers.fallbacks == 0 and workers._workers[0].process.pid == pid
        assert workers._workers[0].answered >= 1  # the batch went to the worker
    finally:
        await workers.close()
    assert workers.alive == 0


def test_a_bad_start_rate_names_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        loads_config("[classifier]\nworkers_start_rate = 0\n")
    assert "classifier.workers_start_rate" in str(caught.value)


async def test_a_worker_that_dies_while_loading_its_model_is_replaced() -> None:
    now = [0.0]
    workers = ClassifierWorkers(SPEC, 1, SPEC.build(), clock=lambda: now[0])
    await workers.start()
    try:
        os.kill(workers._workers[0].process.pid, signal.SIGKILL)  # before its ready word
        for _ in range(500):  # its end of the socket closes: it is retired
            if not workers.alive:
                break
            await asyncio.sleep(0.02)
        assert workers.alive == 0
        assert await classify_all(workers, 5) == expected(5)  # here, nothing waits
        now[0] += 61.0
        await classify_all(workers, 1)  # past the backoff: a new worker is started
        assert workers.alive == 1 and await workers.wait_ready()
    finally:
        await workers.close()


class SlowCore:
    """The real classifier on a machine where each verdict takes `seconds` more CPU."""

    def __init__(self, seconds: float) -> None:
        self.inner = SPEC.build()
        self.seconds = seconds

    def signals(self, text: str, *, contact: str = "") -> list[Any]:
        return self.inner.signals(text, contact=contact)

    def classify(
        self, text: str, *, subject: str = "", language: str | None = None, contact: str = ""
    ) -> Classification:
        # Busy, not asleep: the workers count the loop's CPU time spent classifying.
        until = time.thread_time() + self.seconds
        while time.thread_time() < until:
            pass
        return self.inner.classify(text, subject=subject, language=language, contact=contact)


async def test_on_demand_workers_start_when_the_loop_spends_its_share_classifying() -> None:
    """A slow machine's loop runs short of time long before the start rate: the share
    of a second spent classifying starts the worker there."""
    now = [100.0]
    slow = SlowCore(0.03)
    workers = ClassifierWorkers(
        SPEC,
        1,
        slow,
        clock=lambda: now[0],
        start_rate=1_000,  # never reached here
        start_share=0.1,  # 100 ms of a second
    )
    await workers.start()
    try:
        # Four very slow verdicts a second (at least 120 ms of it) are not load yet:
        # fewer than SHARE_MIN_MESSAGES. No process starts.
        for _ in range(3):
            assert await classify_all(workers, 4) == expected(4)
            now[0] += 1.0
        assert workers.alive == 0
        # Enough messages within one second, together at least 125 ms: the worker starts.
        slow.seconds = 0.005
        assert SHARE_MIN_MESSAGES <= 25
        assert await classify_all(workers, 25) == expected(25)
        assert workers.alive == 1
        assert await workers.wait_ready()
        assert await classify_all(workers, 20) == expected(20)
        assert workers.fallbacks == 0
        assert workers._workers[0].answered >= 1  # the batch went to the worker
    finally:
        await workers.close()


def test_a_bad_start_share_names_the_field() -> None:
    for bad in ("0", "1.5", '"half"'):
        with pytest.raises(ConfigError) as caught:
            loads_config(f"[classifier]\nworkers_start_share = {bad}\n")
        assert "classifier.workers_start_share" in str(caught.value)


def test_the_start_share_applies_to_auto_workers_only() -> None:
    auto = loads_config("[classifier]\nworkers_start_share = 0.2\n").classifier
    assert auto.start_share() == 0.2
    fixed = loads_config("[classifier]\nworkers = 1\nworkers_start_share = 0.2\n").classifier
    assert fixed.start_share() is None  # N workers start with the daemon


async def step_seconds(
    workers: ClassifierWorkers, now: list[float], seconds: int, per: int
) -> None:
    """`seconds` seconds of `per` messages each, the load checked after every one."""
    for _ in range(seconds):
        assert await classify_all(workers, per) == expected(per)
        now[0] += 1.0
        workers.check_load()


async def test_on_demand_workers_stop_when_the_load_stays_low_and_start_again() -> None:
    now = [100.0]
    rate = 40
    workers = ClassifierWorkers(
        SPEC, 1, SPEC.build(), clock=lambda: now[0], start_rate=rate, stop_after=5.0
    )
    await workers.start()
    try:
        assert await classify_all(workers, rate) == expected(rate)  # a burst starts it
        assert await workers.wait_ready()
        process = workers._workers[0].process
        workers.check_load()
        # Three quarters of the start rate or more is still load: the worker stays.
        await step_seconds(workers, now, 10, rate * 3 // 4)
        assert workers.ready == 1 and workers._workers[0].answered >= 10
        # Below that for `stop_after` seconds in a row: it is let go and exits by itself.
        await step_seconds(workers, now, 4, rate * 3 // 4 - 1)
        assert workers.ready == 1
        await step_seconds(workers, now, 2, 3)
        assert workers.alive == 0 and workers.ready == 0
        assert process.wait(timeout=10) == 0  # its socket closed: no kill needed
        # The loop classifies again, nothing lost or counted as a failure.
        assert await classify_all(workers, 10) == expected(10)
        assert workers.fallbacks == 0
        # A new burst starts a new worker, as the first one did.
        now[0] += 1.0
        assert await classify_all(workers, rate) == expected(rate)
        assert workers.alive == 1 and await workers.wait_ready()
        assert workers._workers[0].process.pid != process.pid
    finally:
        await workers.close()
    assert workers.alive == 0


async def test_a_short_lull_does_not_stop_the_worker() -> None:
    now = [100.0]
    workers = ClassifierWorkers(
        SPEC, 1, SPEC.build(), clock=lambda: now[0], start_rate=40, stop_after=5.0
    )
    await workers.start()
    try:
        await classify_all(workers, 40)
        assert await workers.wait_ready()
        workers.check_load()
        for _ in range(3):  # four quiet seconds, then one busy one: the count starts over
            await step_seconds(workers, now, 4, 0)
            await step_seconds(workers, now, 1, 40)
        assert workers.ready == 1
        await step_seconds(workers, now, 6, 0)  # a lull as long as `stop_after` does
        assert workers.ready == 0
    finally:
        await workers.close()


async def test_the_workers_share_of_a_second_keeps_it_below_the_stop_rate() -> None:
    """On a slow core a low rate still takes a big share of a second to classify: the
    CPU the worker reports for its batches keeps the worker that the share started."""
    now = [100.0]
    workers = ClassifierWorkers(
        SPEC,
        1,
        SPEC.build(),
        clock=lambda: now[0],
        start_rate=1_000,  # three quarters of it are never reached here
        start_share=0.0001,  # a tenth of a millisecond: a few verdicts are well above it
        stop_after=3.0,
    )
    await workers.start()
    try:
        assert await classify_all(workers, 25) == expected(25)  # started by the share
        assert await workers.wait_ready()
        workers.check_load()
        # 12 messages a second, far below the rate's stop point, but their CPU is above
        # the share's: the worker stays.
        await step_seconds(workers, now, 6, 12)
        assert workers.ready == 1 and workers._worker_seconds > 0.0
        # Nothing to classify: below both; it stops.
        await step_seconds(workers, now, 4, 0)
        assert workers.ready == 0
    finally:
        await workers.close()


def test_workers_stop_after_applies_to_auto_workers_and_names_bad_values() -> None:
    assert loads_config("").classifier.stop_after() == 30.0
    assert loads_config("[classifier]\nworkers = 1\n").classifier.stop_after() is None
    for bad in ("0", "-5", '"soon"'):
        with pytest.raises(ConfigError) as caught:
            loads_config(f"[classifier]\nworkers_stop_after = {bad}\n")
        assert "classifier.workers_stop_after" in str(caught.value)
