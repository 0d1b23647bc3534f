"""Classification on the machine's other cores: worker processes running the same model.

The trained classifier is the largest single cost of an ingest on the event loop
(about a fifth of it under load), and the loop shares one interpreter lock with the
SQLite writer. With `[classifier] workers = N` it runs in N processes of its own
instead: the loop hands them the messages that arrived in one iteration as one batch
over a socket and reads the verdicts back when they are ready, so many messages cost
one pickle and two socket writes.

The verdicts are those of the in-process classifier, bit for bit: each worker builds
it from the same settings (`ClassifierSpec`). Nothing is lost when a worker fails:
a batch it dies on, or does not answer within `BATCH_TIMEOUT`, is classified in the
event loop instead (the worker is killed), and a new worker starts after a backoff.
While no worker is ready (none started yet, one still loading its model, or all
failed), messages are classified in the loop as without workers: nothing waits.

`workers = "auto"` (the default) starts its worker on demand: the first time the loop
classifies `[classifier] workers_start_rate` messages within one second, or spends
`workers_start_share` of one second classifying, whichever comes first. The share is
what scales with the machine: on a slow core the loop runs short of time at a lower
rate, and the worker pays sooner. A quiet daemon stays one process, and at lower rates
classifying in the loop costs less CPU and answers sooner than a round trip to a worker.
For that reason an on-demand worker also stops again: once the messages handed to it
have stayed below three quarters of the start rate, and of the start share (the CPU the
worker spends classifying, which is what the loop would spend), in every second of
`[classifier] workers_stop_after` seconds in a row. One busy second starts the worker,
a long quiet stretch stops it: that, and the quarter between the two points, keep a
load near them from flapping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import structlog

from router.core import Classifier
from router.model import Classification

log = structlog.get_logger("router.classify")

# A batch not answered within this long is taken back (a hung or overloaded worker).
BATCH_TIMEOUT = 10.0
# Messages per batch at most: a long queue is split so one write stays small.
MAX_BATCH = 256
# A worker that has not loaded its model within this long is given up on.
BOOT_TIMEOUT = 30.0
# How soon a failed worker is started again, doubling up to the cap.
RESTART_BACKOFF = 1.0
RESTART_BACKOFF_MAX = 60.0

# Where the router package is, so a worker imports the same code as the daemon.
_ROOT = str(Path(__file__).resolve().parents[1])
_PYTHONPATH = os.environ.get("PYTHONPATH", "")

# One message to classify: text, subject, language (None: detect), contact.
Request = tuple[str, str, str | None, str]


@dataclass(frozen=True, slots=True)
class ClassifierSpec:
    """What builds a classifier: picklable, so a worker process builds the same one."""

    model: str
    amount_threshold: float
    vip_contacts: frozenset[str]
    model_path: str | None

    def build(self) -> Classifier:
        """Return the classifier these settings describe."""
        from router.classify import RuleClassifier

        if self.model == "rules":
            return RuleClassifier(
                amount_threshold=self.amount_threshold, vip_contacts=self.vip_contacts
            )
        from router.intent import ModelClassifier

        return ModelClassifier(
            amount_threshold=self.amount_threshold,
            vip_contacts=self.vip_contacts,
            model_path=self.model_path,
        )


def classify_batch(classifier: Classifier, batch: list[Request]) -> list[Classification]:
    """Return the verdict of each request, in order."""
    return [
        classifier.classify(text, subject=subject, language=language, contact=contact)
        for text, subject, language, contact in batch
    ]


def _serve(conn: Connection) -> None:
    """A worker process: read the settings, build the classifier, then answer batches
    until the daemon closes its end of the socket."""
    # The daemon decides when a worker ends (it closes the socket): a Ctrl-C, a terminal's
    # hangup or a stop sent to the whole process group must not cut a batch short.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        spec: ClassifierSpec = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    classifier = spec.build()
    try:
        conn.send_bytes(pickle.dumps(None))  # ready: the model is loaded
    except OSError:
        return  # let go while loading (the load fell, or the daemon stopped)
    while True:
        try:
            batch = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        began = time.thread_time()
        try:
            # The verdicts and the CPU they took: the share of a second the loop would
            # spend on them, which tells the daemon when the worker no longer pays.
            answer: Any = (classify_batch(classifier, batch), time.thread_time() - began)
        except Exception as exc:  # the loop classifies this batch itself and says why
            answer = f"{type(exc).__name__}: {exc}"
        conn.send_bytes(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))


class _Worker:
    """One worker process, its end of the socket and the batch it is working on."""

    def __init__(self, process: subprocess.Popen[bytes], conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.batch: list[tuple[Request, asyncio.Future[Classification]]] = []
        self.sent_at = 0.0
        self.started_at = 0.0
        self.ready = False  # the worker said its model is loaded; batches go to it from then
        self.answered = 0  # batches it has answered

    @property
    def busy(self) -> bool:
        return bool(self.batch)


# A few slow verdicts (the first ones after start, a long text, a pause of the machine)
# are not load: the share starts the workers only in a second holding this many.
SHARE_MIN_MESSAGES = 20
# Where on-demand workers stop, as a fraction of the rate and share that start them.
# Close under the start: measured with bench/ingest.py on 2 vCPUs, a worker still cost
# more CPU than it saved at 400 msg/s, with 500 as the start rate (bench/README.md).
STOP_FRACTION = 0.75
# A worker let go because the load fell exits when its socket closes; past this many
# seconds it is killed.
STOP_GRACE = 5.0


class ClassifierWorkers:
    """Classifies through worker processes; the loop's own classifier stands in for them."""

    def __init__(
        self,
        spec: ClassifierSpec,
        workers: int,
        local: Classifier,
        *,
        clock: Callable[[], float] = time.monotonic,
        batch_timeout: float = BATCH_TIMEOUT,
        on_fallback: Callable[[int], None] = lambda count: None,
        start_rate: int | None = None,
        start_share: float | None = None,
        stop_after: float | None = None,
    ) -> None:
        """Remember the settings; processes start with `start()`.

        `on_fallback` is told how many messages were classified in the loop because
        a worker failed (a metric). With a `start_rate` or a `start_share` (on demand)
        the processes start the first time the loop classifies that many messages, or
        spends that share of a second classifying, within one second; with neither
        they start with `start()`. With `stop_after` as well, on-demand workers stop
        once the load has stayed below `STOP_FRACTION` of what starts them for that many
        seconds.
        """
        self.spec = spec
        self.on_fallback = on_fallback
        self.batch_timeout = batch_timeout
        self.size = workers
        self.local = local  # the same classifier in this process: the fallback
        self.clock = clock
        self._workers: list[_Worker] = []
        self._queue: list[tuple[Request, asyncio.Future[Classification]]] = []
        self._dispatch_soon = False
        self._restart_at = 0.0
        self._backoff = RESTART_BACKOFF
        self._closed = False
        self._watch: asyncio.Task[None] | None = None
        self._ready = 0  # workers that have loaded their model
        self._all_ready = asyncio.Event()  # set while every worker is ready
        self.start_rate = start_rate
        self.start_share = start_share
        # False until the load asks for workers.
        self._demanded = start_rate is None and start_share is None
        self._second_began = 0.0  # the demand count's one-second window
        self._in_second = 0
        self._seconds_in_second = 0.0  # time spent classifying here in that window
        self.fallbacks = 0  # messages classified in the loop because a worker failed
        self.stop_after = stop_after
        self._handed = 0  # requests queued for the workers, ever
        self._worker_seconds = 0.0  # CPU seconds the workers spent classifying, ever
        self._load_mark = (0.0, 0, 0.0)  # clock, `_handed` and `_worker_seconds` then
        self._quiet_since: float | None = None  # since when the load stays low
        # Workers stopped because the load fell, and when each must be gone by.
        self._stopping: list[tuple[subprocess.Popen[bytes], float]] = []

    @property
    def alive(self) -> int:
        """Return how many workers run."""
        return len(self._workers)

    @property
    def ready(self) -> int:
        """Return how many workers have loaded their model and take batches."""
        return self._ready

    async def start(self) -> None:
        """Start the workers (unless on demand) and the watch over them."""
        if self._demanded:
            for _ in range(self.size):
                self._spawn()
        self._watch = asyncio.create_task(self._watch_batches(), name="classifier-workers")

    async def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> bool:
        """Wait until every worker has loaded its model; return whether they all did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_ready.wait(), timeout)
        return self._ready >= self.size

    async def close(self) -> None:
        """Stop the workers; batches in flight are classified here."""
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for worker in list(self._workers):
            self._retire(worker, "stopping", restart=False)
        for process, _ in self._stopping:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)
        self._reap(force=True)
        self._classify_here(self._queue)
        self._queue = []

    async def classify(
        self, text: str, *, subject: str = "", language: str | None = None, contact: str = ""
    ) -> Classification:
        """Return the verdict for one message (from a worker, or here when none is ready)."""
        if not self._ready:
            # No worker has its model loaded (none asked for yet, starting, or failed):
            # this message is classified here at once rather than wait for one.
            # Until the load asks for workers, the time spent here is counted: by the
            # thread's CPU clock, since waiting for the interpreter lock (held by the
            # SQLite writer) is not classifying.
            counting = not self._demanded
            began = time.thread_time() if counting else 0.0
            verdict = self.local.classify(text, subject=subject, language=language, contact=contact)
            if counting:
                self._count_demand(time.thread_time() - began)
            self._maybe_restart()
            return verdict
        future: asyncio.Future[Classification] = asyncio.get_running_loop().create_future()
        self._handed += 1
        self._queue.append(((text, subject, language, contact), future))
        if not self._dispatch_soon:
            # Everything that arrives in this loop iteration goes in one batch.
            self._dispatch_soon = True
            asyncio.get_running_loop().call_soon(self._dispatch)
        return await future

    # -- batches -------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand queued requests to idle workers, one batch each."""
        self._dispatch_soon = False
        for worker in list(self._workers):
            if not self._queue:
                return
            if worker.busy or not worker.ready:
                continue
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                worker.conn.send_bytes(
                    pickle.dumps([request for request, _ in batch], pickle.HIGHEST_PROTOCOL)
                )
            except (OSError, ValueError):
                self._queue = batch + self._queue  # for the next worker, or classified here
                self._retire(worker, "socket closed")
                continue
            worker.batch = batch
            worker.sent_at = self.clock()
        if not self._ready:
            self._fallback_queue()

    def _answered(self, worker: _Worker) -> None:
        """Read a worker's verdicts (a loop reader callback) and hand out the next batch."""
        try:
            answer = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            self._retire(worker, f"worker ended: {type(exc).__name__}")
            self._dispatch()
            return
        if not worker.ready:
            if answer is not None:  # anything before the ready word is a broken worker
                self._retire(worker, "worker spoke before it was ready")
                return
            worker.ready = True
            self._ready += 1
            if self._ready >= self.size:
                self._all_ready.set()
            log.info("classifier.worker_ready", pid=worker.process.pid, workers=self._ready)
            if self._queue:
                self._dispatch()
            return
        batch, worker.batch = worker.batch, []
        worker.answered += 1
        if isinstance(answer, str):  # the worker's classifier raised: classify here
            log.warning("classifier.worker_batch_failed", error=answer, messages=len(batch))
            self._classify_here(batch)
        else:
            verdicts, took = answer
            self._worker_seconds += took
            for (_, future), verdict in zip(batch, verdicts, strict=True):
                if not future.done():
                    future.set_result(verdict)
        self._backoff = RESTART_BACKOFF
        if self._queue:
            self._dispatch()

    async def _watch_batches(self) -> None:
        """Take back batches a worker sits on, and start workers that failed again."""
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            for worker in list(self._workers):
                if worker.busy and now - worker.sent_at > self.batch_timeout:
                    self._retire(worker, f"no answer within {self.batch_timeout:g} s")
                elif not worker.ready and now - worker.started_at > BOOT_TIMEOUT:
                    self._retire(worker, f"not ready within {BOOT_TIMEOUT:g} s")
            self._maybe_restart()
            if self._queue and any(w.ready and not w.busy for w in self._workers):
                self._dispatch()
            self.check_load()
            self._reap()

    # -- stopping when the load falls ------------------------------------------------

    def check_load(self) -> None:
        """Measure the load since the last check (the watch calls this every second) and
        stop on-demand workers it no longer pays for."""
        now = self.clock()
        began, handed_then, seconds_then = self._load_mark
        if now <= began:
            return  # no time has passed: nothing to measure
        self._load_mark = (now, self._handed, self._worker_seconds)
        if self.stop_after is None or not self._demanded or not self._ready:
            self._quiet_since = None
            return
        rate = (self._handed - handed_then) / (now - began)
        share = (self._worker_seconds - seconds_then) / (now - began)
        if not self._low_load(rate, share):
            self._quiet_since = None
            return
        if self._quiet_since is None:
            self._quiet_since = now
        busy = self._queue or any(worker.busy for worker in self._workers)
        if now - self._quiet_since >= self.stop_after and not busy:
            self._stop_for_low_load(rate)

    def _low_load(self, rate: float, share: float) -> bool:
        """Whether `rate` messages a second, costing `share` of a second to classify, are
        below the stop point of both start thresholds."""
        if self.start_rate is not None and rate >= self.start_rate * STOP_FRACTION:
            return False
        return self.start_share is None or share < self.start_share * STOP_FRACTION

    def _stop_for_low_load(self, rate: float) -> None:
        """Let the idle workers go (their socket closes; they exit on their own) and go
        back to classifying in the loop, counting demand as before the start."""
        log.info(
            "classifier.workers_stopped",
            reason="load fell",
            per_second=round(rate, 1),
            quiet_seconds=round(self.clock() - (self._quiet_since or 0.0), 1),
            workers=len(self._workers),
        )
        deadline = self.clock() + STOP_GRACE
        for worker in list(self._workers):
            self._workers.remove(worker)
            if worker.ready:
                self._ready -= 1
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.conn.close()
            self._stopping.append((worker.process, deadline))
        self._all_ready.clear()
        self._demanded = False
        self._quiet_since = None
        self._second_began, self._in_second, self._seconds_in_second = self.clock(), 0, 0.0

    def _reap(self, *, force: bool = False) -> None:
        """Collect stopped workers that have exited; kill those past their grace."""
        now = self.clock()
        still: list[tuple[subprocess.Popen[bytes], float]] = []
        for process, deadline in self._stopping:
            if process.poll() is not None:
                continue
            if force or now >= deadline:
                process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=1.0)
                continue
            still.append((process, deadline))
        self._stopping = still

    # -- processes -----------------------------------------------------------------

    def _spawn(self) -> None:
        # A fresh interpreter running this module (not a fork of a threaded daemon, and
        # not multiprocessing's spawn, which would import the daemon's __main__ again).
        parent, child = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (_ROOT, _PYTHONPATH)))}
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "router.classify_workers", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            parent.close()
            child.close()
            log.error("classifier.worker_start_failed", error=str(exc))
            self._restart_at = self.clock() + self._backoff
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX)
            return
        child.close()
        conn = Connection(parent.detach())
        worker = _Worker(process, conn)
        worker.started_at = self.clock()
        self._workers.append(worker)
        try:
            conn.send_bytes(pickle.dumps(self.spec, pickle.HIGHEST_PROTOCOL))
        except OSError:
            self._retire(worker, "settings not delivered")
            return
        asyncio.get_running_loop().add_reader(conn.fileno(), self._answered, worker)

    def _retire(self, worker: _Worker, reason: str, *, restart: bool = True) -> None:
        """Stop a worker; its batch is classified here; a new one starts after a backoff."""
        if worker not in self._workers:
            return
        self._workers.remove(worker)
        if worker.ready:
            self._ready -= 1
            self._all_ready.clear()
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
        worker.conn.close()
        if worker.process.poll() is None:
            worker.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout=1.0)
        batch, worker.batch = worker.batch, []
        if restart and not self._closed:
            log.warning(
                "classifier.worker_lost",
                reason=reason,
                exitcode=worker.process.returncode,
                messages=len(batch),
                restart_in=round(self._backoff, 1),
            )
            self._restart_at = self.clock() + self._backoff
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX)
        self._classify_here(batch)

    def _count_demand(self, took: float) -> None:
        """Count a message classified here (`took` CPU seconds); ask for the workers once
        a second holds enough messages or enough time spent classifying."""
        now = self.clock()
        if now - self._second_began >= 1.0:
            self._second_began, self._in_second, self._seconds_in_second = now, 0, 0.0
        self._in_second += 1
        self._seconds_in_second += took
        if (self.start_rate is not None and self._in_second >= self.start_rate) or (
            self.start_share is not None
            and self._in_second >= SHARE_MIN_MESSAGES
            and self._seconds_in_second >= self.start_share
        ):
            self._demanded = True
            log.info(
                "classifier.workers_wanted",
                per_second=self._in_second,
                seconds_classifying=round(self._seconds_in_second, 4),
                workers=self.size,
            )

    def _maybe_restart(self) -> None:
        if (
            self._closed
            or not self._demanded
            or len(self._workers) >= self.size
            or self.clock() < self._restart_at
        ):
            return
        while len(self._workers) < self.size:
            before = len(self._workers)
            self._spawn()
            if len(self._workers) == before:
                return

    def _fallback_queue(self) -> None:
        queue, self._queue = self._queue, []
        self._classify_here(queue)

    def _classify_here(self, batch: list[tuple[Request, asyncio.Future[Classification]]]) -> None:
        """Classify requests in this process (same classifier, same verdicts)."""
        before = self.fallbacks
        for (text, subject, language, contact), future in batch:
            if future.done():
                continue
            self.fallbacks += 1
            try:
                future.set_result(
                    self.local.classify(text, subject=subject, language=language, contact=contact)
                )
            except Exception as exc:
                future.set_exception(exc)
        if self.fallbacks > before:
            self.on_fallback(self.fallbacks - before)


if __name__ == "__main__":  # a worker: python -m router.classify_workers FD
    _serve(Connection(int(sys.argv[1])))
