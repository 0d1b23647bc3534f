"""Tests for crisis detection, router/crisis.py.

Deterministic: every test drives time itself (an injected clock, or `at=`), and
random streams come from seeded generators. Every example text was written for
these tests. No timing assertions here; bench/crisis_bench.py measures speed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from router.crisis import (
    CrisisConfig,
    CrisisDetector,
    CrisisEvent,
    excerpt,
    jaccard,
    subject_shingles,
)

T0 = 1_700_000_000.0  # an arbitrary epoch second; the detector starts here

WATER_OUTAGE = [  # five customers, near-identical subjects (written for these tests)
    "小区今天停水了，什么时候恢复？",
    "小区今天停水，什么时候恢复？",
    "【投诉】小区今天停水了，什么时候恢复",
    "光明小区今天停水了什么时候恢复啊",
    "我们小区今天停水，什么时候恢复",
]
UNRELATED_ZH = [
    "手机屏幕碎了能保修吗",
    "快递三天了还没到",
    "发票开错了，请重新开",
    "客服态度太差",
    "退款一直没有到账",
    "会员积分被清零了",
]


def filler(n: int) -> str:
    """Return a text about its own subject (so filler messages never cluster)."""
    return f"case {n}: " + " ".join(WORDS[(n * p) % len(WORDS)] for p in (1, 7, 13))


WORDS = [f"w{i:03d}x" for i in range(997)]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def detector(**overrides: object) -> CrisisDetector:
    """Return a detector that starts at T0 with the given config overrides."""
    return CrisisDetector(CrisisConfig.model_validate(overrides), clock=Clock())


class Feed:
    """Feeds numbered messages to a detector and keeps every event it returns."""

    def __init__(self, det: CrisisDetector) -> None:
        self.det = det
        self.events: list[CrisisEvent] = []
        self.n = 0

    def msg(
        self,
        at: float,
        *,
        contact: str | None = None,
        label: str = "complaint",
        severity: str = "P2",
        text: str = "",
        subject: str = "",
    ) -> list[CrisisEvent]:
        self.n += 1
        ev = self.det.observe(
            f"m{self.n}",
            contact if contact is not None else f"c{self.n}",
            label,
            severity,
            text or filler(self.n),
            subject,
            at,
        )
        self.events.extend(ev)
        return ev

    def tick(self, at: float) -> list[CrisisEvent]:
        ev = self.det.tick(at)
        self.events.extend(ev)
        return ev

    def steady(self, start: float, end: float, gap: float) -> float:
        """One complaint every `gap` seconds from distinct contacts; return the end time."""
        t = start
        while t < end:
            self.msg(t)
            t += gap
        return t

    def of(self, reason: str) -> list[CrisisEvent]:
        return [e for e in self.events if e.reason == reason]


# -- config ---------------------------------------------------------------------------


def test_config_defaults_are_the_documented_ones() -> None:
    cfg = CrisisConfig()
    assert cfg.enabled and cfg.rate_enabled and cfg.subject_enabled
    assert cfg.labels == ("complaint",) and cfg.severities == ("P0",)
    assert (cfg.rate_window, cfg.baseline_window) == (300.0, 3600.0)
    assert (cfg.rate_multiple, cfg.min_complaints, cfg.clear_ratio) == (3.0, 10, 1.5)
    assert (cfg.subject_contacts, cfg.subject_window) == (5, 600.0)
    assert cfg.excerpt_chars == 80 and cfg.target is None


def test_config_accepts_toml_shaped_input() -> None:
    cfg = CrisisConfig.model_validate(
        {"target": "ops-mqtt", "labels": ["complaint", "suggestion"], "severities": []}
    )
    assert cfg.labels == ("complaint", "suggestion") and cfg.severities == ()


@pytest.mark.parametrize(
    ("values", "loc"),
    [
        ({"rate_window": 600, "baseline_window": 900}, ("baseline_window",)),
        ({"rate_window": 30, "baseline_window": 86400}, ("baseline_window",)),
        ({"rate_multiple": 2.0, "clear_ratio": 2.0}, ("clear_ratio",)),
        ({"rate_multiple": 1.0}, ("rate_multiple",)),
        ({"min_complaints": 0}, ("min_complaints",)),
        ({"excerpt_chars": 81}, ("excerpt_chars",)),
        ({"labels": []}, ("labels",)),
        ({"labels": ["praise"]}, ("labels", 0)),
        ({"target": "Not A Name"}, ("target",)),
        ({"subject_similarity": 0}, ("subject_similarity",)),
        ({"max_clusters": 10**9}, ("max_clusters",)),
        ({"rate_windw": 300}, ("rate_windw",)),
    ],
)
def test_config_rejects_bad_values_with_their_path(values: dict, loc: tuple) -> None:
    with pytest.raises(ValidationError) as err:
        CrisisConfig.model_validate(values)
    assert loc in [e["loc"] for e in err.value.errors()]


def test_config_is_frozen() -> None:
    cfg = CrisisConfig()
    with pytest.raises(ValidationError):
        cfg.rate_multiple = 5.0  # type: ignore[misc]


# -- text helpers ------------------------------------------------------------------------


def test_shingles_are_han_bigrams_and_content_words() -> None:
    assert subject_shingles("停电了") == {"停电", "电了"}
    assert subject_shingles("电") == {"电"}
    assert subject_shingles("Re: The website is DOWN") == {"website", "down"}
    # Long digit runs (order, phone numbers) and stray letters are not the subject.
    assert subject_shingles("Order 20240611123 not delivered") == {"order", "not", "delivered"}
    assert subject_shingles("can’t log in") == {"cant", "log"}
    assert subject_shingles("回复：停水") == {"停水"}
    # Words naming the kind of message are not its subject.
    assert subject_shingles("Complaint") == frozenset()
    assert subject_shingles("【投诉】停水") == {"停水"}
    # Mixed text: both kinds of shingles.
    assert subject_shingles("APP闪退") == {"app", "闪退"}


def test_jaccard() -> None:
    assert jaccard(frozenset({"a", "b"}), frozenset({"b", "c"})) == pytest.approx(1 / 3)
    assert jaccard(frozenset(), frozenset()) == 0.0


@pytest.mark.parametrize("text", ["short", "x" * 500, "很长的投诉" * 50, "a\n\n b\t c"])
def test_excerpt_is_at_most_80_chars_and_flat(text: str) -> None:
    out = excerpt(text)
    assert len(out) <= 80 and "\n" not in out and "\t" not in out
    assert excerpt(text, 0) == ""


# -- complaint rate ------------------------------------------------------------------------


def test_steady_complaint_rate_raises_nothing() -> None:
    # Three complaints a minute on average (15 per short window, above min_complaints),
    # arriving at random (seeded), for four hours.
    f = Feed(detector(baseline_floor=100.0))
    rng = random.Random(4)
    t = T0
    while t < T0 + 4 * 3600:
        f.msg(t)
        t += rng.expovariate(3 / 60)
    assert f.events == []  # the filler texts are all different: no same_subject either


def spike(f: Feed, start: float, n: int, over: float) -> float:
    """`n` complaints from distinct contacts spread evenly over `over` seconds."""
    for i in range(n):
        f.msg(start + i * over / n, text=f"第{i}位客户：APP 今天一直闪退，无法下单！" * 5)
    return start + over


def test_spike_raises_once_with_evidence_stays_raised_and_clears_after_hold() -> None:
    f = Feed(detector())
    # An hour of one complaint a minute: baseline 60/h, threshold 180/h = 15 per 5 min.
    t = f.steady(T0, T0 + 3600, 60)
    before = f.n
    spike_start = t
    t = spike(f, t, 30, 120)
    raised = f.of("complaint_rate")
    assert len(raised) == 1
    ev = raised[0]
    assert (ev.kind, ev.key) == ("raised", "complaint_rate")
    assert ev.baseline == pytest.approx(60, rel=0.1)
    assert ev.count >= 10 and ev.rate >= 3 * ev.baseline
    assert spike_start <= ev.started_at == ev.at <= t
    assert 1 <= len(ev.evidence) <= 10
    assert all(len(e.excerpt) <= 80 for e in ev.evidence)
    # Evidence is the latest complaints, newest first, from the spike itself.
    ids = [int(e.message_id[1:]) for e in ev.evidence]
    assert ids == sorted(ids, reverse=True) and min(ids) > before
    assert len({e.contact for e in ev.evidence}) == len(ev.evidence)

    # Still high for 15 minutes: no second alert.
    for _ in range(15):
        t = spike(f, t, 20, 60)
        f.tick(t)
    assert len(f.of("complaint_rate")) == 1

    # Back to one a minute; tick every 10 s for an hour.
    fell = t
    end = t + 3600
    while t < end:
        f.msg(t)
        for k in range(6):
            f.tick(t + 10 * k)
        t += 60
    events = f.of("complaint_rate")
    assert [e.kind for e in events] == ["raised", "cleared"]
    cleared = events[1]
    assert cleared.key == ev.key and cleared.started_at == ev.started_at
    assert cleared.baseline == ev.baseline  # the episode's baseline, frozen at raise
    # The rate only drops under 1.5 x baseline once the spike left the 5 min window,
    # then must stay there for clear_hold (600 s).
    assert cleared.at >= fell + 600
    assert cleared.at <= fell + 300 + 600 + 60
    assert cleared.rate < 1.5 * ev.baseline and cleared.evidence == ()


def test_spike_at_startup_is_measured_against_the_floor() -> None:
    f = Feed(detector(baseline_floor=20.0))
    spike(f, T0 + 1, 12, 100)  # 12 in 5 min = 144/h >= 3 x 20/h
    (ev,) = f.of("complaint_rate")
    assert ev.kind == "raised" and ev.baseline == 20.0
    # With a higher floor the same burst is no crisis.
    g = Feed(detector(baseline_floor=100.0))
    spike(g, T0 + 1, 12, 100)
    assert g.of("complaint_rate") == []


def test_a_quiet_night_is_not_a_crisis() -> None:
    # Almost nothing for hours, then a few complaints close together: a big multiple
    # of a tiny baseline, but fewer than min_complaints.
    f = Feed(detector())
    f.msg(T0 + 100)
    f.tick(T0 + 3 * 3600)
    spike(f, T0 + 3 * 3600, 9, 60)
    assert f.of("complaint_rate") == []
    spike(f, T0 + 3 * 3600 + 60, 1, 1)  # the tenth makes it one
    assert [e.kind for e in f.of("complaint_rate")] == ["raised"]


def test_inquiries_and_suggestions_do_not_count_toward_the_rate() -> None:
    f = Feed(detector())
    for i in range(200):
        f.msg(T0 + i, label="inquiry" if i % 2 else "suggestion")
    assert f.events == []
    assert f.det.rate()[0] == 0


def test_an_urgent_inquiry_counts_as_a_complaint() -> None:
    # A safety threat (P0) counts whatever its label.
    f = Feed(detector())
    for i in range(12):
        f.msg(T0 + i, label="inquiry", severity="P0", text=f"{i}楼闻到很重的煤气味，怎么办？")
    # Both: twelve contacts about one gas smell are also a same_subject crisis.
    assert [e.reason for e in f.events] == ["same_subject", "complaint_rate"]


def test_one_contact_sending_many_complaints_is_not_a_spike() -> None:
    f = Feed(detector())
    for i in range(100):
        f.msg(T0 + i, contact="angry@example.com")
    assert f.events == [] and f.det.rate()[0] == 1


def test_prime_seeds_the_baseline_after_a_restart() -> None:
    # The store says 600 complaints in the last hour: 30 in 5 minutes is normal.
    det = detector()
    det.prime(600, 3600, now=T0)
    f = Feed(det)
    spike(f, T0 + 1, 30, 250)
    assert f.of("complaint_rate") == []
    assert det.rate()[2] == pytest.approx(600, rel=0.05)
    with pytest.raises(RuntimeError):
        det.prime(10, 60)


# -- same subject ----------------------------------------------------------------------


def test_five_contacts_same_zh_subject_within_minutes_raise_once() -> None:
    f = Feed(detector())
    t = T0 + 10
    for i, subject in enumerate(WATER_OUTAGE):
        f.msg(t + i * 90, subject=subject, text=f"{subject} 已经等了{i + 2}个小时")
    events = f.of("same_subject")
    assert [e.kind for e in events] == ["raised"]
    ev = events[0]
    assert ev.count == 5 and ev.at == t + 4 * 90
    assert {e.contact for e in ev.evidence} == {f"c{i}" for i in range(1, 6)}
    assert ev.subject == WATER_OUTAGE[0]
    assert ev.key.startswith("same_subject:") and ev.baseline is None
    assert f.of("complaint_rate") == []  # five complaints are under min_complaints

    # More customers about it: still one alert.
    for i in range(5):
        f.msg(t + 600 + i * 30, subject=WATER_OUTAGE[i % 5])
    assert len(f.of("same_subject")) == 1

    # Then nobody for subject_quiet (600 s): cleared, once.
    last = t + 600 + 4 * 30
    for k in range(1, 200):
        f.tick(last + 10 * k)
    events = f.of("same_subject")
    assert [e.kind for e in events] == ["raised", "cleared"]
    assert events[1].key == ev.key and events[1].started_at == ev.started_at
    assert last + 600 <= events[1].at <= last + 610
    assert f.det.open_alerts() == []


def test_english_subjects_cluster_too() -> None:
    f = Feed(detector())
    subjects = [
        "Website down, cannot log in",
        "website is down - can't log in",
        "Cannot log in, website down?",
        "Your website is down and I cannot log in",
        "Site down: cannot log in to website",
    ]
    for i, s in enumerate(subjects):
        f.msg(T0 + 60 * i, subject="", text=s)  # chat: no subject line, the text is used
    assert [e.kind for e in f.of("same_subject")] == ["raised"]


def test_the_same_contact_five_times_is_repeat_contact_not_a_crisis() -> None:
    f = Feed(detector())
    for i, subject in enumerate(WATER_OUTAGE * 2):
        f.msg(T0 + 30 * i, contact="13800000000", subject=subject)
    assert f.events == []


def test_dissimilar_subjects_raise_nothing() -> None:
    f = Feed(detector())
    for i, subject in enumerate(UNRELATED_ZH):
        f.msg(T0 + 10 * i, subject=subject)
    assert f.events == []


def test_same_subject_spread_over_an_hour_is_not_a_crisis() -> None:
    f = Feed(detector())
    for i, subject in enumerate(WATER_OUTAGE):
        f.msg(T0 + 12 * 60 * i, subject=subject)  # 12 minutes apart, window 10
    assert f.events == []


def test_inquiries_about_one_subject_count_only_when_configured() -> None:
    f = Feed(detector())
    for i, s in enumerate(WATER_OUTAGE):
        f.msg(T0 + 10 * i, subject=s, label="inquiry")
    assert f.events == []
    g = Feed(detector(subject_labels=["complaint", "inquiry"]))
    for i, s in enumerate(WATER_OUTAGE):
        g.msg(T0 + 10 * i, subject=s, label="inquiry")
    assert [e.reason for e in g.events] == ["same_subject"]


def test_messages_with_too_little_text_are_not_clustered() -> None:
    f = Feed(detector())
    for i in range(10):
        f.msg(T0 + i, subject="退款", text="?")
    assert f.of("same_subject") == [] and f.det.sizes()["clusters"] == 0


# -- bounds, time and robustness ---------------------------------------------------------


def random_subjects(rng: random.Random, n: int) -> Iterator[str]:
    pool = "停水电梯故障退款快递发票会员积分屏幕保修物业噪音漏油异响投诉客服账单套餐信号宽带"
    words = ["refund", "late", "broken", "screen", "bill", "wifi", "parcel", "rude", "noise"]
    for _ in range(n):
        if rng.random() < 0.5:
            yield "".join(rng.choice(pool) for _ in range(rng.randint(4, 14)))
        else:
            yield " ".join(rng.choice(words) for _ in range(rng.randint(2, 6)))


def test_memory_stays_bounded_after_100k_observations() -> None:
    cfg = CrisisConfig(max_clusters=300, max_contacts=500, evidence_max=5)
    det = CrisisDetector(cfg, clock=Clock())
    rng = random.Random(7)
    seen_sizes = []
    t = T0
    for i, subject in enumerate(random_subjects(rng, 100_000)):
        t += rng.expovariate(20)  # ~20 messages a second: 100k in ~85 min
        det.observe(
            f"m{i}",
            f"c{rng.randrange(50_000)}",
            rng.choice(("complaint", "complaint", "inquiry", "suggestion")),
            "P2",
            subject,
            subject,
            t,
        )
        if i % 10_000 == 9_999:
            seen_sizes.append(det.sizes())
    for s in seen_sizes:
        assert s["clusters"] <= 300
        assert s["contacts"] <= 500
        assert s["evidence"] <= 5
        assert s["buckets"] <= 30 + 360 + 1
        assert s["cluster_contacts"] <= 300 * 5
        assert s["index_entries"] <= 300 * 20
        assert s["open_subject_alerts"] <= 64
    # No growth between the first and last tenth: the structures are at their caps.
    assert seen_sizes[-1]["clusters"] <= max(seen_sizes[0]["clusters"], 300)


def test_the_injected_clock_is_used_when_no_time_is_given() -> None:
    clock = Clock()
    det = CrisisDetector(CrisisConfig(), clock=clock)
    events = []
    for i in range(12):
        clock.t = T0 + i
        events += det.observe(f"m{i}", f"c{i}", "complaint", "P2", "停电了，太差了")
    # Twelve customers about one thing: same_subject at the fifth, the rate at the tenth.
    assert [(e.reason, e.at) for e in events] == [
        ("same_subject", T0 + 4),
        ("complaint_rate", T0 + 9),
    ]
    clock.t += 3600
    cleared = det.tick()  # quiet for an hour; the rate is first seen low now...
    clock.t += 600
    cleared += det.tick()  # ...and still low after clear_hold
    assert sorted((e.kind, e.reason) for e in cleared) == [
        ("cleared", "complaint_rate"),
        ("cleared", "same_subject"),
    ]


def test_time_going_backwards_is_taken_as_now() -> None:
    f = Feed(detector())
    f.msg(T0 + 1000)
    f.msg(T0 + 10)  # a late message from a slow channel
    assert f.det.rate()[0] == 2
    with pytest.raises(ValueError):
        f.det.observe("x", "y", "complaint", "P2", "t", at=float("nan"))


def test_disabled_detector_says_nothing() -> None:
    f = Feed(detector(enabled=False))
    spike(f, T0, 50, 60)
    for i, s in enumerate(WATER_OUTAGE):
        f.msg(T0 + 61 + i, subject=s)
    assert f.events == []


def test_events_are_json_ready() -> None:
    f = Feed(detector())
    for i in range(12):
        f.msg(T0 + i)
    out = json.loads(json.dumps([e.to_dict() for e in f.events], ensure_ascii=False))
    assert out[0]["kind"] == "raised" and out[0]["reason"] == "complaint_rate"
    assert set(out[0]["evidence"][0]) >= {"message_id", "contact", "excerpt"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.floats(0, 400),  # gap before the message, seconds
            st.integers(0, 8),  # contact
            st.sampled_from(["complaint", "inquiry"]),
            st.sampled_from(WATER_OUTAGE + UNRELATED_ZH),
        ),
        max_size=150,
    )
)
def test_alerts_alternate_raised_then_cleared_per_key(
    stream: list[tuple[float, int, str, str]],
) -> None:
    det = CrisisDetector(CrisisConfig(min_complaints=3, clear_hold=60), clock=Clock())
    open_keys: set[str] = set()
    t = T0
    for i, (gap, contact, label, subject) in enumerate(stream):
        t += gap
        events = det.observe(f"m{i}", f"c{contact}", label, "P2", subject, subject, t)
        events += det.tick(t + gap / 2)
        for e in events:
            if e.kind == "raised":
                assert e.key not in open_keys
                open_keys.add(e.key)
            else:
                assert e.key in open_keys
                open_keys.remove(e.key)
    assert {k for _, k, _ in det.open_alerts()} == open_keys
