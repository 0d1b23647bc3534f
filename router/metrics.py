"""Prometheus metrics of one daemon, kept in a registry of its own.

A registry per daemon (not the process-global default) keeps tests that start several
pipelines in one process from sharing counters, and keeps `/metrics` free of
anything we did not choose to export.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics import MetricWrapperBase

# Ingest commits take about a millisecond; deliveries to a local broker a few.
# Waits for an agent: seconds to an hour (the longest default SLA).
_WAIT_BUCKETS = (0.5, 1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """Every metric the router exports."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        # (metric, label values) -> child: labels() validates and locks on every call,
        # which costs more than the increment itself on the per-message path.
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.ingested = Counter(
            "omnirouter_messages_ingested_total",
            "Messages committed, by channel and label.",
            ["channel", "label"],
            registry=r,
        )
        self.duplicates = Counter(
            "omnirouter_messages_duplicate_total",
            "Messages a source delivered again (idempotent replays), by channel.",
            ["channel"],
            registry=r,
        )
        self.ingest_errors = Counter(
            "omnirouter_ingest_errors_total",
            "Messages that could not be committed (the source was not acknowledged).",
            ["channel"],
            registry=r,
        )
        self.assigned = Counter(
            "omnirouter_assignments_total",
            "Messages assigned to an agent, by queue and how (direct, sticky, dequeued).",
            ["queue", "how"],
            registry=r,
        )
        self.taken_back = Counter(
            "omnirouter_offers_taken_back_total",
            "Assignments taken back from an agent: not accepted in time, or agent off line.",
            ["why"],
            registry=r,
        )
        self.sla_breaches = Counter(
            "omnirouter_sla_breaches_total",
            "Messages still waiting for an agent at their SLA deadline, by queue and label.",
            ["queue", "label"],
            registry=r,
        )
        self.severity = Counter(
            "omnirouter_messages_severity_total",
            "Messages by severity P0-P3.",
            ["severity"],
            registry=r,
        )
        self.deliveries = Counter(
            "omnirouter_deliveries_total",
            "Delivery attempts to agent tools, by target and result (ok, retry, dead).",
            ["target", "result"],
            registry=r,
        )
        self.dead_letters = Counter(
            "omnirouter_dead_letters_total",
            "Deliveries moved to the dead letters, by target.",
            ["target"],
            registry=r,
        )
        self.tickets_closed = Counter(
            "omnirouter_tickets_closed_total",
            "Resolved tickets closed (archived) after [lifecycle] close_after.",
            registry=r,
        )
        self.csat = Counter(
            "omnirouter_csat_answers_total",
            "Satisfaction survey answers, by score (1-5).",
            ["score"],
            registry=r,
        )
        self.transfers = Counter(
            "omnirouter_transfers_total",
            "Conversations transferred, by target kind (agent or queue).",
            ["to"],
            registry=r,
        )
        self.actions = Counter(
            "omnirouter_agent_actions_total",
            "Agent actions received, by action and outcome.",
            ["action", "outcome"],
            registry=r,
        )
        self.crisis_events = Counter(
            "omnirouter_crisis_events_total",
            "Crisis alerts raised and cleared, by reason (complaint_rate, same_subject).",
            ["reason", "kind"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "omnirouter_queue_depth",
            "Messages waiting for a free agent, by queue.",
            ["queue"],
            registry=r,
        )
        self.queue_oldest_wait = Gauge(
            "omnirouter_queue_oldest_wait_seconds",
            "How long the longest-waiting message of each queue has waited (0: empty), "
            "refreshed at each scrape.",
            ["queue"],
            registry=r,
        )
        self.agent_load = Gauge(
            "omnirouter_agent_open_conversations",
            "Open conversations held by each agent.",
            ["agent"],
            registry=r,
        )
        self.agent_capacity = Gauge(
            "omnirouter_agent_capacity",
            "Conversations each agent may hold at once.",
            ["agent"],
            registry=r,
        )
        self.agent_present = Gauge(
            "omnirouter_agent_present",
            "1 when the agent is taking work.",
            ["agent"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "omnirouter_outbox_backlog",
            "Outbox items queued, waiting for a retry or in flight in this process.",
            registry=r,
        )
        self.instance_info = Gauge(
            "omnirouter_instance_info",
            "1, labelled with this instance's id (`[daemon] instance`).",
            ["instance"],
            registry=r,
        )
        self.leases_held = Gauge(
            "omnirouter_leases_held",
            "Leases this instance holds: its own, and one per single-owner channel or tool "
            "it reads.",
            registry=r,
        )
        self.driver_up = Gauge(
            "omnirouter_driver_connected",
            "1 when a channel or adapter is connected, by kind and name.",
            ["kind", "name", "state"],
            registry=r,
        )
        self.driver_last_success = Gauge(
            "omnirouter_driver_last_success_timestamp_seconds",
            "When a channel last synced or an adapter last delivered (Unix time; lag = now - it).",
            ["kind", "name"],
            registry=r,
        )
        self.ingest_seconds = Histogram(
            "omnirouter_ingest_seconds",
            "Time from a channel handing over a message to its durable commit.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "omnirouter_delivery_seconds",
            "Time from commit to the agent tool acknowledging the assignment.",
            ["target"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.wait_seconds = Histogram(
            "omnirouter_assignment_wait_seconds",
            "Time from a message's arrival to its assignment, by label and whether the "
            "assignment came within its SLA.",
            ["label", "within_sla"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.classifier_workers = Gauge(
            "omnirouter_classifier_workers",
            "Classifier worker processes running (`[classifier] workers`).",
            registry=r,
        )
        self.classifier_fallbacks = Counter(
            "omnirouter_classifier_fallbacks_total",
            "Messages classified in the event loop because a classifier worker failed.",
            registry=r,
        )
        self.task_restarts = Counter(
            "omnirouter_task_restarts_total",
            "Supervised tasks restarted after a failure.",
            ["task"],
            registry=r,
        )
        self.reloads = Counter(
            "omnirouter_config_reloads_total",
            "Configuration reloads, by result (ok, rejected).",
            ["result"],
            registry=r,
        )

        # The web channel's browser side (widget WebSockets, form, API posts).
        self.web_connections = Gauge(
            "omnirouter_web_websockets",
            "Widget WebSocket connections open, by channel.",
            ["channel"],
            registry=r,
        )
        self.web_messages = Counter(
            "omnirouter_web_messages_total",
            "Web channel messages, by channel and direction (in: from customers, out: "
            "acknowledgements and replies to them); rate() gives messages per minute.",
            ["channel", "direction"],
            registry=r,
        )
        self.web_rejected = Counter(
            "omnirouter_web_rejected_total",
            "Web channel requests and widget messages refused, by channel and reason.",
            ["channel", "reason"],
            registry=r,
        )

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """Return metric.labels(*values), cached: values in the metric's label order.

        Label values come from small fixed sets (channels, labels, queues, agents,
        targets), so the cache stays as small as the metric's own table of children.
        """
        key = (metric, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        """Return the Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
