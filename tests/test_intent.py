"""Tests for the trained intent model, the router/intent package.

Every example text here was written for these tests; none is taken from the
training pool. The test that needs the pool is skipped when it is not there.
"""

from __future__ import annotations

import json
import math
import os
import time
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.classify import RuleClassifier
from router.intent import (
    DEFAULT_MODEL_PATH,
    IntentModel,
    ModelClassifier,
    eval_command,
    evaluate,
    extract,
    read_records,
    sample_weights,
    source_group,
    stratified_split,
    train,
    train_command,
)
from router.model import LABELS, SEVERITIES, Classification

REPO = Path(__file__).resolve().parent.parent


def _pool_path() -> Path:
    env = os.environ.get("OMNIROUTER_CLASSIFY_DATA")
    if env:
        return Path(env)
    # Beside the checkout (the usual layout), else the machine's shared folder (a clone
    # made elsewhere, as CI's may be).
    candidates = [REPO.parent / "shared", Path("/work/shared")]
    for shared in candidates:
        path = shared / "data" / "classify" / "train.jsonl"
        if path.exists():
            return path
    return candidates[0] / "data" / "classify" / "train.jsonl"


# A tiny labelled set, written for these tests (zh and en, all three labels).
TINY = [
    ("What time do you open tomorrow?", "inquiry", "en"),
    ("How can I change my delivery address?", "inquiry", "en"),
    ("Do you sell gift cards?", "inquiry", "en"),
    ("Is the blue one still in stock?", "inquiry", "en"),
    ("My order arrived broken and nobody answers my emails", "complaint", "en"),
    ("Terrible service, I waited an hour and left", "complaint", "en"),
    ("You charged me twice, I want my money back", "complaint", "en"),
    ("The kettle stopped working after a week, awful", "complaint", "en"),
    ("It would be great if the app had a dark mode", "suggestion", "en"),
    ("Please add an option to export my receipts", "suggestion", "en"),
    ("You should open a store in the north of town", "suggestion", "en"),
    ("Consider adding a loyalty card", "suggestion", "en"),
    ("请问明天几点开门？", "inquiry", "zh"),
    ("怎么修改收货地址", "inquiry", "zh"),
    ("你们有礼品卡卖吗", "inquiry", "zh"),
    ("蓝色的还有货吗？", "inquiry", "zh"),
    ("收到的东西是坏的，客服也不回复", "complaint", "zh"),
    ("服务太差了，等了一个小时", "complaint", "zh"),
    ("重复扣款两次，要求退款", "complaint", "zh"),
    ("水壶用了一周就坏了，太失望了", "complaint", "zh"),
    ("建议增加夜间模式", "suggestion", "zh"),
    ("希望可以导出电子发票", "suggestion", "zh"),
    ("要是能在北边开一家店就好了", "suggestion", "zh"),
    ("可以考虑推出会员卡", "suggestion", "zh"),
]


def tiny_records() -> list[dict[str, str]]:
    return [
        {"text": t, "label": lb, "lang": lang, "source": f"tests:{lang}"} for t, lb, lang in TINY
    ]


@pytest.fixture(scope="module")
def shipped() -> IntentModel:
    return IntentModel.load()


@pytest.fixture(scope="module")
def tiny_model() -> IntentModel:
    return train(tiny_records(), seed=5, epochs=3, include_extra=False)


# -- the shipped model ----------------------------------------------------------------
def test_shipped_model_exists_loads_fast_and_is_small() -> None:
    assert DEFAULT_MODEL_PATH.is_file(), "router/models/intent.bin must be committed"
    assert DEFAULT_MODEL_PATH.stat().st_size < 20 * 1024 * 1024
    start = time.perf_counter()
    model = IntentModel.load()
    assert time.perf_counter() - start < 2.0
    assert model.version.startswith("intent-")
    assert len(model.weights) > 100


CLEAR = [
    # written for this test
    ("Where can I download last month's invoice?", "inquiry"),
    ("Can you tell me how long shipping to Spain takes?", "inquiry"),
    ("Do you accept payment by bank transfer?", "inquiry"),
    ("This is the third time my parcel is late, absolutely unacceptable!", "complaint"),
    ("The vacuum cleaner broke after two days and the shop refuses a refund", "complaint"),
    ("Your staff were rude and nobody has replied to my complaint", "complaint"),
    ("It would be really helpful if you added a search box to the help page", "suggestion"),
    ("Please consider adding an option to pay in instalments", "suggestion"),
    ("I suggest you open the branch on Saturdays too", "suggestion"),
    ("请问你们的门店周日营业吗？", "inquiry"),
    ("我想咨询一下这款热水器的保修期是多久", "inquiry"),
    ("麻烦帮我查一下订单到哪里了", "inquiry"),
    ("买的耳机用了三天就坏了，客服一直推脱不给退货，太气人了", "complaint"),
    ("快递员态度恶劣，还把包裹扔在门口，我要投诉", "complaint"),
    ("建议你们在App里增加一个查询积分的功能", "suggestion"),
    ("希望以后可以支持微信支付，会方便很多", "suggestion"),
]


@pytest.mark.parametrize(("text", "label"), CLEAR)
def test_shipped_model_gets_clear_examples_right(
    shipped: IntentModel, text: str, label: str
) -> None:
    got, conf, scores, top = shipped.predict(text)
    assert got == label, (text, scores, top)
    assert 0.0 < conf <= 1.0
    assert set(scores) == set(LABELS)
    assert abs(sum(scores.values()) - 1.0) < 1e-6
    assert top and all(isinstance(n, str) and isinstance(w, float) for n, w in top)


@pytest.mark.parametrize(
    "text",
    [
        "我的order还没有到，请问什么时候能deliver？",
        "App 的 dark mode 什么时候上线? 建议尽快加上",
        "The 客服 was really rude to me, 太差了",
    ],
)
def test_mixed_language_text_is_classified(shipped: IntentModel, text: str) -> None:
    label, conf, scores, _ = shipped.predict(text)
    assert label in LABELS
    assert conf == max(scores.values())


@pytest.mark.parametrize(
    "text", ["", " ", "\n\t", "?!?!", "1234567890", "😀😀😀", "\x00\x01", "ａｂｃ", "x" * 20000]
)
def test_empty_or_garbage_text_does_not_crash(shipped: IntentModel, text: str) -> None:
    label, conf, _, _ = shipped.predict(text)
    assert label in LABELS
    assert 0.0 < conf <= 1.0
    clf = ModelClassifier(shipped)
    assert clf.classify(text).label in LABELS


@pytest.mark.parametrize(
    "text",
    ["", "😀😀😀", "asdkjh qwe zxcmnb", "مرحبا، أريد استرداد أموالي", "x" * 20000, "\x00\x01"],
)
def test_a_text_the_model_knows_nothing_of_gets_the_rules_prior(
    shipped: IntentModel, text: str
) -> None:
    # No cue and no word the model was trained on: its punctuation and "no cue" weights
    # alone named a class with more than the triage threshold's confidence.
    _, _, _, _, known = shipped.assess(text, {})
    assert known == 0
    cls = ModelClassifier(shipped).classify(text)
    prior = RuleClassifier().classify(text)
    assert (cls.label, cls.confidence, cls.scores) == (prior.label, prior.confidence, prior.scores)
    assert cls.label == "inquiry" and cls.confidence < 0.5
    assert cls.features == ()


def test_one_known_word_or_cue_is_enough_for_the_model_to_decide(shipped: IntentModel) -> None:
    clf = ModelClassifier(shipped)
    for text in ("😀 refund", "😀 建议", "please 😀"):
        hits, _ = clf.rules.analyse(text)
        label, conf, scores, top, known = shipped.assess(text, hits)
        assert known or hits
        assert (label, conf, scores, top) == reference_predict(shipped, text, hits)
        cls = clf.classify(text)
        assert (cls.label, cls.confidence) == (label, conf)
        assert cls.features


def test_model_classifier_has_the_rule_classifier_interface(shipped: IntentModel) -> None:
    clf = ModelClassifier(shipped, amount_threshold=5000, vip_contacts=frozenset({"Boss@X.com"}))
    text = "My heater exploded, I'm calling my lawyer and want ¥8,000 back"
    cls = clf.classify(text, subject="Broken heater", contact="boss@x.com")
    assert isinstance(cls, Classification)
    assert cls.label in LABELS
    assert cls.severity in SEVERITIES
    assert cls.severity == "P0"  # the safety signal, as the rules decide it
    kinds = {s.kind for s in cls.signals}
    assert {"safety", "legal_threat", "amount_over_threshold", "vip"} <= kinds
    rule_kinds = {s.kind for s in RuleClassifier().classify(text).signals}
    assert rule_kinds <= kinds
    assert cls.model_version == shipped.version
    assert cls.features
    assert cls.language == "en"
    assert set(cls.to_dict()) >= {"label", "confidence", "scores", "severity", "signals"}
    assert clf.classify("请问几点开门", language="zh").language == "zh"


# -- training -------------------------------------------------------------------------------
def test_training_is_deterministic(tmp_path: Path) -> None:
    a = train(tiny_records(), seed=7, epochs=3, include_extra=False)
    b = train(tiny_records(), seed=7, epochs=3, include_extra=False)
    assert a.version == b.version
    assert a.weights == b.weights
    probes = [t for t, _, _ in TINY] + ["随便说点什么", "anything at all"]
    assert [a.predict(t) for t in probes] == [b.predict(t) for t in probes]
    c = train(tiny_records(), seed=8, epochs=3, include_extra=False)
    assert c.weights != a.weights  # the seed orders the examples


def test_save_load_round_trip(tiny_model: IntentModel, tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    tiny_model.save(path)
    again = IntentModel.load(path)
    assert again.version == tiny_model.version
    assert again.temperature == tiny_model.temperature
    for text, _, _ in TINY:
        assert again.predict(text) == tiny_model.predict(text)
    with pytest.raises(ValueError, match="not an omnirouter intent model"):
        (tmp_path / "bad.bin").write_bytes(b"nope")
        IntentModel.load(tmp_path / "bad.bin")


def test_tiny_model_learns_its_training_set(tiny_model: IntentModel) -> None:
    right = sum(tiny_model.predict(t)[0] == lb for t, lb, _ in TINY)
    assert right >= len(TINY) - 2


def test_evaluate_report_structure(tiny_model: IntentModel) -> None:
    rep = evaluate(tiny_model, tiny_records())
    for part in [rep["overall"], *rep["by_lang"].values(), *rep["by_source"].values()]:
        assert set(part) >= {"n", "accuracy", "macro_f1", "per_class", "confusion"}
        assert set(part["per_class"]) == set(LABELS)
        for m in part["per_class"].values():
            assert set(m) == {"precision", "recall", "f1", "support"}
        assert set(part["confusion"]) == set(LABELS)
        assert sum(sum(row.values()) for row in part["confusion"].values()) == part["n"]
    assert set(rep["by_lang"]) == {"en", "zh"}
    assert rep["overall"]["n"] == len(TINY)
    assert 0.0 <= rep["calibration"]["ece"] <= 1.0
    assert rep["calibration"]["table"]


def test_sample_weights_balance_labels_and_sources() -> None:
    recs = [{"text": "a", "label": "inquiry", "source": "x"}] * 10 + [
        {"text": "b", "label": "complaint", "source": "y"}
    ] * 2
    w = sample_weights(recs)
    assert abs(sum(w[:10]) - sum(w[10:])) < 1e-6


def test_source_groups_follow_the_readme_prefixes() -> None:
    assert source_group("wo580/BI-:car_complain.csv@abc#12") == "chezhiwang"
    assert source_group("svwyaojiong/L1:x.csv#1") == "chezhiwang"
    assert source_group("github-issue:foo/bar#12 (label: enhancement)") == "github-zh"
    assert source_group("thu-coai/CrossWOZ:data/x@y#1") == "crosswoz"
    assert source_group("omnirouter-authored") == "authored"


def test_stratified_split_keeps_every_cell() -> None:
    recs = tiny_records() * 5
    tr, te = stratified_split(recs, seed=1)
    assert not set(tr) & set(te)
    assert len(tr) + len(te) == len(recs)
    assert {recs[i]["label"] for i in te} == set(LABELS)


def test_commands_train_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps(r, ensure_ascii=False) for r in tiny_records()), encoding="utf-8"
    )
    corr = tmp_path / "c.jsonl"
    corr.write_text(json.dumps({"text": "能不能加个搜索框", "label": "suggestion"}) + "\n")
    out = tmp_path / "m.bin"
    argv = ["--data", str(data), "--out", str(out), "--seed", "3", "--no-extra"]
    assert train_command([*argv, "--corrections", str(corr)]) == 0
    assert out.is_file()
    capsys.readouterr()
    assert eval_command(["--data", str(data), "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "macro-F1" in printed and "confusion" in printed and "lang=zh" in printed
    assert eval_command(["--data", str(data), "--model", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"]["overall"]["n"] == len(TINY)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "praise"}\n')
    assert train_command(["--data", str(bad), "--out", str(out)]) == 2


def test_read_records_reports_the_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok", "label": "inquiry"}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2"):
        read_records(p)


def test_shipped_extra_examples_are_marked_as_ours() -> None:
    for path in (REPO / "router" / "models").glob("extra_*.jsonl"):
        for rec in read_records(path):
            assert rec["source"] == "omnirouter-authored", path


# -- on the real pool -------------------------------------------------------------------------
def test_model_trained_on_part_of_the_pool_generalises() -> None:
    path = _pool_path()
    if not path.is_file():
        pytest.skip(
            f"training pool not found at {path} (set OMNIROUTER_CLASSIFY_DATA or put "
            "shared/ beside the repo)"
        )
    records = read_records(path)
    tr, te = stratified_split(records, test_share=0.9, seed=2)  # train on 10% for speed
    model = train([records[i] for i in tr], seed=2, calibrate=False)
    rep = evaluate(model, [records[i] for i in te][:3000])
    assert rep["overall"]["macro_f1"] >= 0.85, rep["overall"]


def test_punctuation_only_texts_are_classified_and_trainable() -> None:
    from router.intent import ModelClassifier, extract

    clf = ModelClassifier()
    for text in (".", " , ", ",", "？！", "..."):
        cls = clf.classify(text)
        assert cls.label in LABELS and 0 <= cls.confidence <= 1
        extract(text, {})  # the training path must not divide by zero either


# -- predict_hits against the feature extractor it mirrors ------------------------------------
def reference_predict(
    model: IntentModel, text: str, hits: dict[str, tuple[str, float]], subject: str = ""
) -> tuple[str, float, dict[str, float], list[tuple[str, float]]]:
    """Score `extract`'s feature list plainly: logits, softmax at temperature, top 5 reasons."""
    feats = extract(text, hits, subject=subject)
    z = model.logits(feats)
    scaled = [v / model.temperature for v in z]
    peak = max(scaled)
    exp = [math.exp(v - peak) for v in scaled]
    probs = [e / sum(exp) for e in exp]
    best = max(range(len(LABELS)), key=probs.__getitem__)
    contrib: dict[str, float] = {}
    for idx, x, name in feats:
        w = model.weights.get(idx)
        if w is None or name == "bias":
            continue
        c = x * (w[best] - (sum(w) - w[best]) / (len(LABELS) - 1))
        if c > 0:
            contrib[name] = contrib.get(name, 0.0) + c
    ranked = sorted(contrib.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    top = [(name, round(c, 4)) for name, c in ranked]
    return LABELS[best], probs[best], dict(zip(LABELS, probs, strict=True)), top


@cache
def _pinned_models() -> tuple[IntentModel, ...]:
    """Return the shipped model and a small trained one (another temperature, few weights)."""
    return IntentModel.load(), train(tiny_records(), seed=5, epochs=3, include_extra=False)


def assert_predict_hits_matches_extract(text: str, subject: str = "") -> None:
    """Check predict_hits against the reference, for both models, cold and memoised."""
    hits, _ = RuleClassifier().analyse(text, subject=subject)
    for model in _pinned_models():
        want = reference_predict(model, text, hits, subject)
        for _ in range(2):  # the second call reads the memos the first one filled
            assert model.predict_hits(text, hits, subject=subject) == want, (text, subject)


PINNED = [
    *(t for t, _, _ in TINY),
    *(t for t, _ in CLEAR),
    "我的order还没有到，请问什么时候能deliver？",
    "The 客服 was really rude to me, 太差了",
    "新能源车的性能怎么样？能源消耗大吗",  # 能 inside nouns, and as the modal
    "I can't log in and you don’t answer!!! see https://x.example/a?b=1 @support",
    "Order #12345 of 3,000.50 arrived broken; refund 2 items??",
    "",
    ".",
    "?!?",
    "ＡＢＣ　全角 ｔｅｘｔ １２３",
    "word " * 500,  # past the token limit
]


@pytest.mark.parametrize("text", PINNED)
@pytest.mark.parametrize("subject", ["", "Re: 投诉 broken kettle?"])
def test_predict_hits_equals_scoring_the_extracted_features(text: str, subject: str) -> None:
    assert_predict_hits_matches_extract(text, subject)


# Pieces that reach every branch of the extractor: function words kept in the shape
# view, content words, rule cues, style marks, masked digits/URLs/handles, apostrophes.
_PIECES = [
    *"我你您的了吗呢建议希望能能源性能投诉退款客服请问怎么坏差没不",
    *"i you my your can could would please not never why how was ordered".split(),
    *"refund broken terrible awful suggest add option kettle parcel invoice".split(),
    "can't",
    "don’t",
    "it's",
    "42",
    "3.5",
    "https://a.example/x",
    "www.b.cn",
    "@amy",
    "?",
    "？",
    "!",
    "！",
    ".",
    ",",
    "，",
    "。",
    "~",
    ";",
    "😀",
    "Ｘ",
    "\n",
]


@settings(max_examples=200, deadline=None)
@given(
    words=st.lists(
        st.tuples(st.sampled_from(_PIECES), st.sampled_from(["", " ", " ", ", "])), max_size=40
    ),
    noise=st.text(max_size=12),
    subject=st.one_of(st.just(""), st.text(max_size=15), st.sampled_from(_PIECES)),
)
def test_predict_hits_equals_scoring_the_extracted_features_on_generated_text(
    words: list[tuple[str, str]], noise: str, subject: str
) -> None:
    text = "".join(w + sep for w, sep in words) + noise
    assert_predict_hits_matches_extract(text, subject)
