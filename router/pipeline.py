"""The pipeline: ingest → classify → schedule → commit → outbox → deliver.

A thin façade over parts with one job each, all working on one shared `Core`:

* `router/intake.py` — a customer message, classified, placed and committed (the sink);
* `router/queue_work.py` — waiting messages handed out, lapsed offers taken back;
* `router/agent_work.py` — agents' actions (accept, resolve, reply, transfer, relabel,
  presence), refused ones answered with a reason;
* `router/alerts.py` — P0, SLA-breach and crisis alerts for the on-duty manager;
* `router/tickets.py` — ticket status tokens; `router/threads.py` — conversations;
* `router/roster.py` — agents from the config; `router/gauges.py` — agent/queue gauges.

The scheduler's in-memory state is rebuilt from the store at start (`restore`): open
conversations give each agent its load, queued messages go back to their queues, and
pending outbox items are sent again under their original delivery ids.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import structlog

from router.actions import ACTIONS
from router.agent_work import AgentWork, Verdict
from router.alerts import Alerts
from router.classify_workers import ClassifierSpec, ClassifierWorkers
from router.config import Config
from router.contacts import ContactChange
from router.core import Classifier, Core
from router.crisis import CrisisDetector
from router.drivers import ActionSink, AgentAction, Receipt, TicketStatus
from router.gauges import Gauges
from router.intake import Intake, classifier_spec, make_classifier
from router.metrics import Metrics
from router.model import InboundMessage
from router.outbox import Dispatcher
from router.queue_work import QueueWork, work_from_queued, work_from_stored
from router.roster import (
    agents_from_config,
    agents_view,
    board_view,
    policy_from_config,
    queues_view,
)
from router.schedule import Scheduler
from router.shared_routing import SharedRouting
from router.store import Store
from router.threads import Threads
from router.tickets import Tickets

log = structlog.get_logger("router.pipeline")

# How much of a waiting message's subject the status page shows.
STATUS_EXCERPT_CHARS = 60

__all__ = ["Pipeline", "agents_from_config", "make_classifier"]


class Pipeline:
    """Routes messages; one per daemon, shared by every channel and agent tool."""

    def __init__(
        self,
        config: Config,
        store: Store,
        metrics: Metrics,
        dispatcher: Dispatcher,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Build the parts; nothing is read from the store before `restore`."""
        scheduler = Scheduler(
            agents_from_config(config),
            policy_from_config(config),
            explain=config.scheduling.explain,
        )
        self.core = Core(
            config=config,
            store=store,
            metrics=metrics,
            dispatcher=dispatcher,
            clock=clock,
            scheduler=scheduler,
            classifier=self._make_classifier(config),
            crisis=self._make_crisis(config, clock),
            threads=Threads(),
            tickets=Tickets(store),
            gauges=Gauges(scheduler, dispatcher),
        )
        self.alerts = Alerts(self.core)
        self.intake = Intake(self.core, self.alerts)
        self.queues = QueueWork(self.core, self.alerts)
        self.agent_work = AgentWork(self.core, self.queues)
        # With other instances on the store (PostgreSQL): their changes, folded in.
        self.shared = SharedRouting(self.core, self.queues)
        # Set once restore() has rebuilt memory: agent tools start first (pending outbox
        # items need them) and may hand over actions that only make sense afterwards.
        self._restored = asyncio.Event()

    @staticmethod
    def _make_classifier(config: Config) -> Classifier:
        return make_classifier(config)

    async def _start_classifier_workers(self, config: Config, classifier: Classifier) -> None:
        """Run the classifier in `[classifier] workers` processes (none: in the loop)."""
        core = self.core
        old, core.classifier_workers = core.classifier_workers, None
        if old is not None:
            await old.close()
        count = config.classifier.worker_count()
        if count:
            metrics = core.metrics
            workers = ClassifierWorkers(
                classifier_spec(config),
                count,
                classifier,
                on_fallback=metrics.classifier_fallbacks.inc,
                start_rate=config.classifier.start_rate(),
                start_share=config.classifier.start_share(),
                stop_after=config.classifier.stop_after(),
            )
            await workers.start()
            core.classifier_workers = workers

    async def close(self) -> None:
        """Stop what the pipeline runs besides the loop (classifier workers)."""
        if self.core.classifier_workers is not None:
            await self.core.classifier_workers.close()
            self.core.classifier_workers = None

    @staticmethod
    def _make_crisis(config: Config, clock: Callable[[], float]) -> CrisisDetector | None:
        crisis = config.classifier.crisis
        return CrisisDetector(crisis, clock=clock) if crisis.enabled else None

    # The parts' shared state, for the daemon, the ops API and tests.
    @property
    def config(self) -> Config:
        """Return the configuration in force."""
        return self.core.config

    @property
    def store(self) -> Store:
        """Return the store."""
        return self.core.store

    @property
    def metrics(self) -> Metrics:
        """Return the metrics registry."""
        return self.core.metrics

    @property
    def dispatcher(self) -> Dispatcher:
        """Return the outbox dispatcher."""
        return self.core.dispatcher

    @property
    def scheduler(self) -> Scheduler:
        """Return the scheduler."""
        return self.core.scheduler

    @property
    def answering_channels(self) -> set[str]:
        """Return the names of channels that answer customers (the daemon fills it)."""
        return self.core.answering_channels

    # -- start and reload --------------------------------------------------------

    async def restore(self) -> None:
        """Rebuild memory from the store: loads, queues, pending sends, recent contacts."""
        core = self.core
        store, scheduler = core.store, core.scheduler
        await self._start_classifier_workers(core.config, core.classifier)
        await core.tickets.load_secret()
        now = core.clock()
        presence = await store.sync_agents(agents_from_config(core.config))
        for agent_id, present in presence.items():
            if agent_id in scheduler.states:
                scheduler.set_presence(agent_id, present, now)
        snap = await store.snapshot(now, core.config.classifier.repeat_contact_window)
        crisis = core.config.classifier.crisis
        if core.crisis is not None and crisis.rate_enabled:
            # The baseline is the complaint rate before the short window: count it in the
            # store, so a restart does not fall back on the floor (and alert on a normal day).
            until = now - crisis.rate_window
            recent = await store.count_messages(
                list(crisis.labels), until - crisis.baseline_window, until
            )
            core.crisis.prime(recent, crisis.baseline_window, now)
        for conv in snap.open_conversations:
            core.threads.opened((conv.channel, conv.thread_key), conv.conversation_id)
            if conv.agent_id:
                scheduler.hold(
                    conv.conversation_id, conv.conversation_id, conv.agent_id, conv.channel_type
                )
        # Only timeouts are kept from before the stop (a hand-off's exclusion is not, as
        # ever), and a timeout needs no reason beside it: explain words it as before.
        excluded = await store.timed_out_agents()
        timeout = scheduler.policy.accept_timeout
        if timeout > 0:
            # Offers not accepted before the stop: their clocks run from when they were made,
            # and when one lapses the message must not go back to who let it lapse before.
            for message_id, _conv, agent_id, assigned_at in await store.pending_offers():
                stored = await store.stored_message(message_id)
                if stored is not None and agent_id in scheduler.states:
                    work = work_from_stored(stored)
                    work.excluded = excluded.get(message_id)
                    scheduler.restore_offer(work, agent_id, assigned_at + timeout)
        for q in snap.queued:
            scheduler.submit(work_from_queued(q, excluded.get(q.message_id)))
        book = self.intake.contacts
        for child, parent in snap.contact_links:
            book.merged(child, parent)
        for key, person in snap.contact_handles:
            book.learn(key, person)
        for identifier, person in snap.contact_identifiers:
            book.learn_identifier(identifier, person)
        for contact_key, at in snap.recent_contacts:
            book.seen(contact_key, at)
        for item in snap.pending_outbox:
            core.dispatcher.submit(item)
        for survey in snap.pending_surveys:
            core.surveys[(survey.channel, survey.thread_key)] = (
                survey.conversation_id,
                survey.until,
            )
        self._restored.set()
        log.info(
            "pipeline.restored",
            open_conversations=len(snap.open_conversations),
            queued=len(snap.queued),
            pending_outbox=len(snap.pending_outbox),
        )
        core.update_gauges()
        await self.queues.drain()

    async def apply_config(self, config: Config) -> None:
        """Take a new, already validated configuration (SIGHUP): roster, thresholds, SLAs."""
        core = self.core
        old_crisis = core.config.classifier.crisis
        old_config = core.config
        core.config = config
        core.classifier = self._make_classifier(config)
        if _worker_settings(config) != _worker_settings(old_config):
            await self._start_classifier_workers(config, core.classifier)
        if config.classifier.crisis != old_crisis:
            core.crisis = self._make_crisis(config, core.clock)
        agents = agents_from_config(config)
        presence = await core.store.sync_agents(agents)
        core.scheduler.policy = policy_from_config(config)
        core.scheduler.explain = config.scheduling.explain
        core.scheduler.set_roster(
            [replace(a, present=presence.get(a.id, a.present)) for a in agents]
        )
        core.update_gauges()
        await self.queues.drain()

    # -- customers -----------------------------------------------------------------

    async def ingest(self, msg: InboundMessage) -> Receipt:
        """Classify, route and commit one message; return only after the commit."""
        return await self.intake.ingest(msg)

    def status_token(self, ticket: str) -> str:
        """Return the token that lets a customer read this ticket."""
        return self.core.tickets.status_token(ticket)

    async def ticket_status(self, ticket: str, token: str) -> TicketStatus | None:
        """Return a ticket's status when the token matches; None otherwise (same for unknown)."""
        return await self.core.tickets.status(ticket, token)

    # -- agents --------------------------------------------------------------------

    async def on_action(self, action: AgentAction) -> None:
        """Apply what an agent did in their tool (the agent tools' action sink).

        A refused action is answered with a `notice` to the agent's tool.
        """
        await self.decide(action, notify=True)

    def actions_from(self, tool: str, *, own_agents_only: bool = False) -> ActionSink:
        """Return the action sink of the agent tool named `tool`.

        With `own_agents_only`, for a tool that authenticates the sender as a whole rather
        than each agent (a webhook callback signed with the webhook's one secret), the tool
        speaks only for the agents it serves: an action for an agent whose tool is another
        one is refused, never applied, and audited like any refusal. Tools that
        authenticate each agent (MQTT logins bound by the broker's ACL, signed mailbox
        tokens, mapped chat users) may carry actions of agents who get work elsewhere.
        """
        if not own_agents_only:
            return self.on_action

        async def sink(action: AgentAction) -> None:
            state = self.core.scheduler.states.get(action.agent_id)
            if state is not None and state.agent.tool != tool and not action.refused:
                log.warning(
                    "agent.action_from_other_tool",
                    agent=action.agent_id,
                    action=action.action,
                    via=tool,
                )
                action = replace(action, refused=f"{action.agent_id} does not work through {tool}")
            await self.on_action(action)

        return sink

    async def act(self, action: AgentAction) -> str:
        """Apply an agent's action; return the outcome (ok, rejected, unsupported)."""
        return (await self.decide(action)).outcome

    async def decide(self, action: AgentAction, *, notify: bool = False) -> Verdict:
        """Apply an agent's action; return its outcome and, when refused, why."""
        await self._restored.wait()
        verdict = Verdict("error")
        try:
            verdict = await self.agent_work.apply(action, notify=notify)
        finally:
            # Unknown names are counted together: the label set stays small.
            name = action.action if action.action in ACTIONS else "unknown"
            self.core.metrics.actions.labels(action=name, outcome=verdict.outcome).inc()
            log.info(
                "agent.action",
                agent=action.agent_id,
                action=name,
                conversation_id=action.conversation_id or None,
                outcome=verdict.outcome,
                reason=verdict.reason or None,
            )
        return verdict

    async def set_presence(self, agent_id: str, present: bool, *, away: bool = False) -> bool:
        """Put an agent on line, away or off line; False if the agent is unknown."""
        return await self.queues.set_presence(agent_id, present, away=away)

    # -- contacts across channels (router/contacts.py) ------------------------------

    async def find_contacts(self, query: str, limit: int = 20) -> list[dict[str, Any]]:
        """Return contacts whose handle, name or identifier contains `query`."""
        return await self.core.store.find_contacts(query, limit)

    async def contact(self, ref: str) -> dict[str, Any] | None:
        """Return a contact with its handles, identifiers, tickets and audit."""
        window = self.core.config.classifier.repeat_contact_window
        return await self.core.store.contact(ref, self.core.clock() - window)

    async def merge_contacts(self, into: str, other: str, actor: str, reason: str) -> ContactChange:
        """Merge `other`'s contact into `into`'s (audited); repeat contacts count together."""
        change = await self.core.store.merge_contacts(into, other, actor, reason, self.core.clock())
        if change.ok:
            self.intake.contacts.merged(change.child, change.parent)
            await self._learn_contact(change.child)
            log.info("contact.merged", contact=change.child, joined=change.parent, actor=actor)
        return change

    async def unmerge_contact(self, ref: str, actor: str, reason: str) -> ContactChange:
        """Undo the merge that made `ref`'s contact part of another (audited)."""
        change = await self.core.store.unmerge_contact(ref, actor, reason, self.core.clock())
        if change.ok:
            self.intake.contacts.unmerged(change.child)
            log.info("contact.unmerged", contact=change.child, left=change.parent, actor=actor)
        return change

    async def _learn_contact(self, ref: str) -> None:
        """Teach the contact book every handle and identifier of a contact just merged."""
        view = await self.contact(ref)
        if view is None:
            return
        book = self.intake.contacts
        for person in view["contacts"]:
            if person["merged_into"]:
                book.merged(person["id"], person["merged_into"])
        for handle in view["handles"]:
            book.learn(handle["key"], handle["contact"])
        for ident in view["identifiers"]:
            book.learn_identifier(ident["identifier"], ident["contact"])

    # -- time and queues -----------------------------------------------------------

    async def drain_queues(self) -> int:
        """Assign waiting messages to agents who have room now; return how many."""
        return await self.queues.drain()

    async def tick(self) -> None:
        """Move time on (about once a second): accept timeouts, SLA breaches, crises."""
        await self.queues.tick()

    async def sync_loads(self) -> None:
        """Count against each agent what other workers on this store hold."""
        self.core.scheduler.sync_external(await self.core.store.open_loads())

    # -- views ---------------------------------------------------------------------

    def agents_view(self) -> list[dict[str, Any]]:
        """Return each agent with load and presence (ops API)."""
        return agents_view(self.core.scheduler)

    def queues_view(self) -> list[dict[str, Any]]:
        """Return each queue's waiting messages, oldest deadline first (ops API)."""
        return queues_view(self.core.scheduler, self.core.clock())

    async def status_board(self) -> dict[str, Any]:
        """Return queues by class and severity, agents, crisis alerts and outbox counts.

        For the status page (`GET /v1/status`): the oldest waiting messages carry a short
        excerpt of their subject (or text) so an operator can tell them apart.
        """
        core = self.core
        now = core.clock()
        board = board_view(core.scheduler, now)
        for item in board["waiting"]:
            stored = await core.store.message(item["message_id"])
            words = (stored.get("subject") or stored.get("text") or "") if stored else ""
            item["excerpt"] = " ".join(str(words).split())[:STATUS_EXCERPT_CHARS]
        crisis = core.crisis
        board["crisis"] = {
            "enabled": crisis is not None,
            "open": [
                {"reason": reason, "key": key, "started_at": started}
                for reason, key, started in (crisis.open_alerts() if crisis else [])
            ],
        }
        board["outbox"] = await core.store.delivery_counts()
        board["now"] = now
        return board


def _worker_settings(config: Config) -> tuple[ClassifierSpec, int, int | None]:
    """Return what the classifier workers are built from (a change restarts them)."""
    workers = config.classifier
    return classifier_spec(config), workers.worker_count(), workers.start_rate()
