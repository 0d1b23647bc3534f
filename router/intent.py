"""The trained intent model: inquiry / complaint / suggestion for Chinese, English and mixed text.

Pure Python at run time and for training (no numpy, no scikit-learn): a multinomial
logistic regression over hashed sparse features, trained with FTRL-proximal
(per-coordinate adaptive steps with L1 and L2, so the weights are sparse and the
artifact is small), then calibrated by temperature scaling.

Why these features. The labelled pool's sources correlate with its labels (each
Chinese class comes from one domain), so a model of words alone learns topic: it
scores ~0.99 on a random split and fails on domains it never saw. The model
therefore sees four groups of features, regularised differently:

| group | what | regularisation |
|---|---|---|
| rule  | the rule classifier's cue sums and verdict; style marks (language-free) | light |
| cue   | each rule cue found ("complaint:投诉", "suggestion:would be nice") | light |
| shape | n-grams of the text, content words masked ("can i X ?", "希望X能X") | medium |
| lex   | token unigrams and bigrams (Han characters are tokens) | strong (L1) |

The rule and shape groups carry intent across domains; the lexical group fixes
what they miss in domains it has seen. Training weights every example so that each
label, and each source inside a label, carries the same total weight, and digits,
URLs and @handles are masked, so one big or formulaic source cannot dominate.

API: `IntentModel.load(path=None)` (None: the shipped `router/models/intent.bin`),
`.predict(text, subject="", language=None) -> (label, confidence, scores,
top_features)`, `.predict_hits(text, hits, subject=...)` (the same from the rule
cue hits, without building a feature list: the hot path), `.version`,
`.save(path)`; `train(records, seed=...)`;
`evaluate(model, records)`; `ModelClassifier`, a drop-in for
`router.classify.RuleClassifier` (same `classify` signature; signals and
severity come from the rules). `train_command` / `eval_command` implement
`omnirouter classifier train|eval`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import random
import re
import struct
import sys
import time
import unicodedata
import zlib
from array import array
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import compress, repeat
from operator import and_, ge, gt, mul, or_
from pathlib import Path
from typing import Any

from router.classify import PRIOR, RuleClassifier, detect_language, severity_for
from router.model import LABELS, Classification

DEFAULT_MODEL_PATH = Path(__file__).resolve().parent / "models" / "intent.bin"
EXTRA_DATA_DIR = Path(__file__).resolve().parent / "models"
_MAGIC = b"OMNIRTR-INTENT\x01\n"
_NL = len(LABELS)
_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}

# -- feature groups -------------------------------------------------------------
_BITS = 20
_MASK = (1 << _BITS) - 1
G_RULE, G_CUE, G_SHAPE, G_LEX = 0, 1, 2, 3
_GROUP_NAMES = ("rule", "cue", "shape", "lex")

# FTRL-proximal settings per group: (alpha, beta, l1, l2).
DEFAULT_REG: dict[str, tuple[float, float, float, float]] = {
    "rule": (0.1, 1.0, 0.0, 1.0),
    "cue": (0.1, 1.0, 0.0, 2.0),
    "shape": (0.1, 1.0, 0.5, 4.0),
    "lex": (0.1, 1.0, 0.5, 4.0),
}

# How much of the rule classifier's own logits is added to the learned ones.
DEFAULT_RULE_WEIGHT = 0.55
DEFAULT_EPOCHS = 3

# Words kept as themselves in the "shape" view of English text: function words,
# modal and question forms, and a few intent verbs. Everything else becomes X.
_EN_FUNCTION = frozenset(
    """
    i me my mine myself we us our ours you your yours u ur he him his she her it its they them their
    this that these those there here a an the some any no not never none all every each more most
    less much many few other another own same such
    is am are was were be been being do does did done doing have has had having get got getting
    can could will would shall should may might must need needs needed want wants wanted like
    love hope hoping wish please plz pls thanks thank thx sorry help know tell let lets make made
    what how why when where which who whom whose whether if then than so but and or because though
    although unless until while as to of in on at for with without from by about into over after
    before again still already yet just even only also too very really quite so ever always
    ok okay yes yeah hey hi hello dear
    add adding allow allowing support supporting enable option options feature features improve
    suggest suggestion idea better instead able possible way
    problem problems issue issues wrong broken fix fixed refund complaint complain file
    again waiting wait received receive nobody anyone someone
    """.split()
)
# Han characters (and marks) kept in the shape view of Chinese text.
_ZH_FUNCTION = frozenset(
    "吗呢吧啊呀哦嘛么了的地得着过是不没无非别有在能会可以要想请问什怎哪几多少谁为啥何如果"
    "应该让给把被对向从到和与跟就才都也还又再很太真最更好差坏我你您他她它们这那个些每一其此"
    "建议希望增加支持功能改进优化添新期待退换赔投诉骗失望烂慢贵久帮查找推荐忙麻烦谢能否够"
    "呗嘿哎唉呵哈"
)
_HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(
    r"https?://\S+|www\.\S+|@\w+|["
    + _HAN
    + r"]|[a-z]+(?:'[a-z]+)*|[0-9]+(?:[.,][0-9]+)*|[?!]+|[.,;:~]"
)
# Style marks (see extract): negation, the writer's own thing, the reader addressed.
_NEG_RE = re.compile(
    r"\b(?:not|no|never|nothing|nobody|none|nowhere|cannot)\b|n't\b|n’t\b"
    r"|(?<!有)没(?!有[^，。,.!?！？]{0,12}[吗？?])|不(?!错|客气|好意思|用|要紧|知道|了解)|未|无法"
)
_MINE_RE = re.compile(r"\b(?:my|mine|our)\b|我的|我们的|我家")
_YOU_RE = re.compile(r"\b(?:you|your|u|ur|yours)\b|你们|您|贵公司|贵司|客服")
# A narrative of what happened (past tense, perfect, 了/过) reports an experience.
_PAST_RE = re.compile(
    r"\b(?:was|were|did|had|have been|has been|got|went|came|bought|ordered|paid|received|"
    r"sent|told|said|took|gave|left|broke)\b|[a-z]{3,}ed\b|[^\x00-\x7f]了|过了|[买用收到]过"
)
_NENG_AFTER = frozenset("源力耗量效")
_NENG_BEFORE = frozenset("性智功动节电体技才新势热核")
_MAX_TOKENS = 400  # long messages: the first 400 tokens decide
_RULE_CLIP = 20.0  # rule cue sums above this add nothing more


def _norm_token(tok: str) -> str:
    """Return the normalised form of one raw token (see _tokens)."""
    c = tok[0]
    if c.isdigit():
        return "0"
    if c == "@":
        return "@u"
    if tok.startswith(("http", "www.")) and len(tok) > 4 and ("/" in tok or "." in tok):
        return "<url>"
    if c in "?!":
        return "?" if "?" in tok else "!"  # "?!?" reads as a question
    if c in ".,;:~":
        return ","
    return tok


_TOKEN_MEMO: dict[str, str] = {}  # raw token -> _norm_token(raw token), bounded
_MEMO_MAX = 1 << 17  # entries per memo before it is emptied (see IntentModel.predict_hits)


def _tokens(text: str) -> list[str]:
    """Return the normalised tokens of `text`: lower case, NFKC, digits/URLs/handles masked."""
    low = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'")
    raw = _TOKEN_RE.findall(low)[:_MAX_TOKENS]
    out = list(map(_TOKEN_MEMO.get, raw))
    if None in out:
        if len(_TOKEN_MEMO) > _MEMO_MAX:
            _TOKEN_MEMO.clear()
        for i, tok in enumerate(raw):
            if out[i] is None:
                out[i] = _TOKEN_MEMO[tok] = _norm_token(tok)
    return out  # type: ignore[return-value]  # no None left


def _is_function(tok: str) -> bool:
    """Return True for tokens kept in the shape view."""
    if len(tok) == 1 and not tok.isascii():
        return tok in _ZH_FUNCTION
    return tok in _EN_FUNCTION or "'" in tok or tok in ("?", "!", ",", "0", "@u", "<url>")


def _hash(group: int, name: str) -> int:
    """Return the feature index of `name` in `group` (stable across processes)."""
    return (group << _BITS) | (zlib.crc32(name.encode("utf-8")) & _MASK)


FeatureList = list[tuple[int, float, str]]


def extract(text: str, hits: dict[str, tuple[str, float]], *, subject: str = "") -> FeatureList:
    """Return (index, value, name) for a message given its rule cue hits."""
    feats: FeatureList = [(_hash(G_RULE, "bias"), 1.0, "bias")]
    # -- rule group: the rule classifier's cue sums per label, and its verdict.
    sums = dict.fromkeys(LABELS, 0.0)
    for label, weight in hits.values():
        sums[label] += weight
    if hits:
        for label in LABELS:
            if sums[label]:
                name = f"rule:{label}"
                feats.append((_hash(G_RULE, name), min(sums[label], _RULE_CLIP) / 4.0, name))
        logits = {k: PRIOR[k] + sums[k] for k in LABELS}
        best = max(LABELS, key=logits.__getitem__)
        second = max(v for k, v in logits.items() if k != best)
        margin = logits[best] - second
        name = f"rule-top:{best}"
        feats.append((_hash(G_RULE, name), 1.0, name))
        if margin >= 2.0:
            name = f"rule-sure:{best}"
            feats.append((_hash(G_RULE, name), 1.0, name))
    else:
        feats.append((_hash(G_RULE, "rule:none"), 1.0, "rule:none"))
    # -- style: language-free marks of how the message is put (a question, a
    # negation, the writer's own thing, the company addressed) and their pairs
    # with the rule verdicts. Chinese and English data both teach them, so they
    # carry to domains neither saw: a question that also complains ("why is my
    # X still not working?") is a grievance, a question alone an inquiry.
    low = text.lower() if not subject else f"{subject} {text}".lower()
    marks = []
    q = "?" in low or "？" in low
    if q:
        marks.append("q")
    if _NEG_RE.search(low):
        marks.append("neg")
    if _MINE_RE.search(low):
        marks.append("mine")
    if _YOU_RE.search(low):
        marks.append("you")
    if _PAST_RE.search(low):
        marks.append("past")
    for a, b in itertools.combinations(list(marks), 2):
        marks.append(f"{a}+{b}")
    if q and sums[LABELS[1]] >= 1.5:
        marks.append("q+complaint")
    if q and sums[LABELS[2]] >= 1.5:
        marks.append("q+suggestion")
    for mk in marks:
        name = "sty:" + mk
        feats.append((_hash(G_RULE, name), 1.0, name))
    # -- cue group
    for cue in hits:
        name = f"cue:{cue}"
        feats.append((_hash(G_CUE, name), 1.0, name))
    # -- shape and lexical groups
    toks = _tokens(f"{subject} , {text}" if subject else text)
    if toks:
        shape: list[str] = ["^"]
        for i, tok in enumerate(toks):
            t = tok if _is_function(tok) else "X"
            if tok == "能" and (
                (i + 1 < len(toks) and toks[i + 1] in _NENG_AFTER)
                or (i and toks[i - 1] in _NENG_BEFORE)
            ):
                t = "X"  # 能 inside a noun (能源, 性能, 智能), not the modal "can"
            if t != "X" or shape[-1] != "X":
                shape.append(t)
        shape.append("$")
        names: set[str] = set()
        for n in (1, 2, 3):
            for i in range(len(shape) - n + 1):
                gram = shape[i : i + n]
                if all(t in ("^", "$", "X", ",") for t in gram):
                    continue  # pure register (length, punctuation-free titles), not intent
                names.add("shape:" + " ".join(gram))
        if names:
            v = 1.0 / math.sqrt(len(names))
            feats.extend((_hash(G_SHAPE, nm), v, nm) for nm in sorted(names))
        # Punctuation is register (titles have none), not intent: shape sees it.
        lex: set[str] = {t for t in toks if t != ","}
        lex.update(f"{a} {b}" for a, b in itertools.pairwise(toks))
        if lex:  # a text of commas alone has no words
            v = 1.0 / math.sqrt(len(lex))
            feats.extend((_hash(G_LEX, "lex:" + nm), v, "lex:" + nm) for nm in sorted(lex))
    return feats


# -- the model --------------------------------------------------------------------
# The shape view as lookups: token -> itself for the tokens _is_function keeps
# (tokens with an apostrophe are kept too, see predict_hits), and every n-gram
# (n <= 3) made of register marks only, which extract leaves out.
_SHAPE_OF = {t: t for t in _EN_FUNCTION | _ZH_FUNCTION | {"?", "!", ",", "0", "@u", "<url>"}}
_REGISTER_GRAMS = frozenset(
    " ".join(g) for n in (1, 2, 3) for g in itertools.product(("^", "$", "X", ","), repeat=n)
)
_JOIN = " ".join
_PREFIX_CRC = {G_SHAPE: zlib.crc32(b"shape:"), G_LEX: zlib.crc32(b"lex:")}
_MARKS = ("q", "neg", "mine", "you", "past")  # the style marks, in extract's order


def _softmax(logits: Sequence[float]) -> list[float]:
    top = max(logits)
    exp = [math.exp(v - top) for v in logits]
    norm = sum(exp)
    return [e / norm for e in exp]


class IntentModel:
    """Weights of the hashed-feature softmax regression, a temperature and a version."""

    def __init__(
        self,
        weights: dict[int, tuple[float, float, float]],
        *,
        temperature: float = 1.0,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.weights = weights
        self.temperature = temperature
        self.meta: dict[str, Any] = dict(meta or {})
        self._rules = RuleClassifier()
        # Lookup tables for `predict_hits`, derived from `weights` (which must not
        # change after construction). `_slots` maps a model index to its slot, a
        # position in `_w` (the weights towards each label) and `_margins` (what
        # predict_features ranks explanations by: the weight towards a label
        # minus the mean of the others). Memos of known feature names (without
        # their group prefix) map to slots, -1 for a rule or cue feature the model
        # does not know. Read-only but for the memos, whose entries are set
        # atomically, and all str -> int, which the garbage collector skips.
        # (Lists, not arrays: indexing a list is much the cheaper.)
        self._slots: dict[int, int] = {}
        self._w: tuple[list[float], ...] = ([], [], [])
        self._margins: tuple[list[float], ...] = ([], [], [])
        self._memo: tuple[dict[str, int], ...] = ({}, {})
        self._ngram_memo: list[dict[str, int]] = [{}, {}]
        self._rule_memo: dict[tuple[Any, ...], tuple[list[int], list[float], list[str]]] = {}
        digest = hashlib.sha256()
        for idx in sorted(weights):
            w = weights[idx]
            digest.update(struct.pack("<I3f", idx, *w))
            self._slots[idx] = len(self._slots)
            total = sum(w)
            for b in range(_NL):
                self._w[b].append(w[b])
                # The expression of predict_features, so contributions are bit-identical.
                self._margins[b].append(w[b] - (total - w[b]) / (_NL - 1))
        digest.update(struct.pack("<f", temperature))
        self.version = f"intent-1+{digest.hexdigest()[:10]}"

    # -- scoring
    def logits(self, feats: FeatureList) -> list[float]:
        """Return the raw (uncalibrated) logits for a feature list."""
        z = [0.0] * _NL
        get = self.weights.get
        for idx, x, _ in feats:
            w = get(idx)
            if w is not None:
                z[0] += w[0] * x
                z[1] += w[1] * x
                z[2] += w[2] * x
        return z

    def predict_features(
        self, feats: FeatureList, *, explain: int = 5
    ) -> tuple[str, float, dict[str, float], list[tuple[str, float]]]:
        """Return label, confidence, scores and top features for a feature list."""
        z = self.logits(feats)
        t = self.temperature
        probs = _softmax([v / t for v in z])
        best = max(range(_NL), key=probs.__getitem__)
        scores = {label: probs[i] for i, label in enumerate(LABELS)}
        top: list[tuple[str, float]] = []
        if explain:
            contrib: dict[str, float] = {}
            get = self.weights.get
            for idx, x, name in feats:
                w = get(idx)
                if w is None or name == "bias":
                    continue
                others = (sum(w) - w[best]) / (_NL - 1)
                c = x * (w[best] - others)
                if c > 0:
                    contrib[name] = contrib.get(name, 0.0) + c
            ranked = sorted(contrib.items(), key=lambda kv: (-kv[1], kv[0]))[:explain]
            top = [(name, round(c, 4)) for name, c in ranked]
        return LABELS[best], probs[best], scores, top

    def _lookup(self, group: int, name: str, key: str, memo: dict[str, int]) -> int:
        """Memoise and return the slot of feature `name` (memo key `key`), -1 if unknown."""
        slot = memo[key] = self._slots.get(_hash(group, name), -1)
        return slot

    def _known(self, group: int, grams: set[str]) -> tuple[list[str], list[int]]:
        """Return the names (sorted, without their prefix) and slots of the known n-grams.

        Names the model knows are memoised; the others are hashed again when met
        again (most are rare, and a memo of every n-gram would not fit a cache).
        """
        known = self._ngram_memo[group - G_SHAPE]
        found = known.keys() & grams
        if len(found) < len(grams):
            rest = list(grams.difference(found))
            # crc32 of "prefix:" + name, as _hash, continuing from the prefix's crc.
            crcs = map(zlib.crc32, map(str.encode, rest), repeat(_PREFIX_CRC[group]))
            idxs = map(or_, map(and_, crcs, repeat(_MASK)), repeat(group << _BITS))
            got = list(map(self._slots.get, idxs))
            if got.count(None) < len(got):
                for name, slot in zip(rest, got, strict=True):
                    if slot is not None:
                        known[name] = slot
                        found.add(name)
        names = sorted(found)
        return names, list(map(known.__getitem__, names))

    def _rule_features(
        self, sums: dict[str, float], flags: tuple[bool, ...]
    ) -> tuple[list[int], list[float], list[str]]:
        """Return slots, values and names of the known rule-group features (as extract)."""
        has_hits, q, neg, mine, you, past = flags
        named: list[tuple[str, float]] = [("bias", 1.0)]
        if has_hits:
            for label in LABELS:
                if sums[label]:
                    named.append((f"rule:{label}", min(sums[label], _RULE_CLIP) / 4.0))
            logits = {k: PRIOR[k] + sums[k] for k in LABELS}
            best = max(LABELS, key=logits.__getitem__)
            second = max(v for k, v in logits.items() if k != best)
            named.append((f"rule-top:{best}", 1.0))
            if logits[best] - second >= 2.0:
                named.append((f"rule-sure:{best}", 1.0))
        else:
            named.append(("rule:none", 1.0))
        marks = [mk for mk, on in zip(_MARKS, (q, neg, mine, you, past), strict=True) if on]
        for a, b in itertools.combinations(list(marks), 2):
            marks.append(f"{a}+{b}")
        if q and sums[LABELS[1]] >= 1.5:
            marks.append("q+complaint")
        if q and sums[LABELS[2]] >= 1.5:
            marks.append("q+suggestion")
        named.extend(("sty:" + mk, 1.0) for mk in marks)
        slots: list[int] = []
        xs: list[float] = []
        names: list[str] = []
        memo = self._memo[G_RULE]
        for name, x in named:
            slot = self._lookup(G_RULE, name, name, memo)
            if slot >= 0:
                slots.append(slot)
                xs.append(x)
                names.append(name)
        return slots, xs, names

    def predict_hits(
        self, text: str, hits: dict[str, tuple[str, float]], *, subject: str = "", explain: int = 5
    ) -> tuple[str, float, dict[str, float], list[tuple[str, float]]]:
        """Return `predict_features(extract(text, hits, subject=subject), explain=explain)`.

        The same result, bit for bit, computed faster (this is the ingest hot
        path): no feature list is built, feature names are looked up in memos
        instead of being hashed each time, features the model has no weights for
        are dropped before sorting (they add nothing), the rule group is memoised
        by its inputs, and names are built only for the features explained. The
        logits add the known features one by one in extract's order, so the
        float sums are those of `logits`. One
        difference: a text whose only tokens are punctuation (".") makes extract
        divide by zero; here it simply has no lexical features.
        """
        # Bounded memos: the n-grams a long-running daemon meets are not. (Replaced,
        # not cleared, so that a call running meanwhile keeps consistent tables.)
        for i, memo in enumerate(self._ngram_memo):
            if len(memo) > _MEMO_MAX:
                self._ngram_memo[i] = {}
        if len(self._rule_memo) > _MEMO_MAX:
            self._rule_memo = {}
        # -- rule group: a function of the cue sums and the style marks, memoised
        sums = dict.fromkeys(LABELS, 0.0)
        for label, weight in hits.values():
            sums[label] += weight
        low = text.lower() if not subject else f"{subject} {text}".lower()
        flags = (
            bool(hits),
            "?" in low or "？" in low,
            _NEG_RE.search(low) is not None,
            _MINE_RE.search(low) is not None,
            _YOU_RE.search(low) is not None,
            _PAST_RE.search(low) is not None,
        )
        key = (*sums.values(), *flags)
        rule = self._rule_memo.get(key)
        if rule is None:
            rule = self._rule_memo[key] = self._rule_features(sums, flags)
        slots, xs, names = rule[0][:], rule[1][:], rule[2][:]
        lookup = self._lookup
        cue_memo = self._memo[G_CUE]
        # -- cue group
        get = cue_memo.get
        for cue in hits:
            slot = get(cue)
            if slot is None:
                slot = lookup(G_CUE, "cue:" + cue, cue, cue_memo)
            if slot >= 0:
                slots.append(slot)
                xs.append(1.0)
                names.append("cue:" + cue)
        # -- shape and lexical groups: distinct n-grams, the known ones in name order
        shape_start = lex_start = len(slots)
        shape_found: list[str] = []
        lex_found: list[str] = []
        toks = _tokens(f"{subject} , {text}" if subject else text)
        if toks:
            mapped = list(map(_SHAPE_OF.get, toks, repeat("X")))
            if "'" in "".join(toks):
                mapped = [t if "'" in t else m for t, m in zip(toks, mapped, strict=True)]
            if "能" in toks:
                n = len(toks)
                for i, tok in enumerate(toks):
                    if tok == "能" and (
                        (i + 1 < n and toks[i + 1] in _NENG_AFTER)
                        or (i and toks[i - 1] in _NENG_BEFORE)
                    ):
                        mapped[i] = "X"  # 能 inside a noun (能源, 性能), as in extract
            # A run of X is one X.
            shape = ["^"]
            shape += [
                t
                for t, prev in zip(mapped, shape + mapped, strict=False)
                if t != "X" or prev != "X"
            ]
            shape.append("$")
            mid = shape[1:]
            grams = set(shape)
            grams.update(map(_JOIN, zip(shape, mid, strict=False)))
            grams.update(map(_JOIN, zip(shape, mid, shape[2:], strict=False)))
            grams -= _REGISTER_GRAMS
            if grams:
                shape_found, found = self._known(G_SHAPE, grams)
                slots += found
                xs += repeat(1.0 / math.sqrt(len(grams)), len(found))
            lex_start = len(slots)
            lex = set(toks)
            lex.discard(",")  # punctuation is register, not intent (as in extract)
            lex.update(map(_JOIN, itertools.pairwise(toks)))
            if lex:
                lex_found, found = self._known(G_LEX, lex)
                slots += found
                xs += repeat(1.0 / math.sqrt(len(lex)), len(found))
        # -- scoring (as logits, _softmax and predict_features), feature by feature
        w0, w1, w2 = self._w
        z0 = z1 = z2 = 0.0
        for slot, x in zip(slots, xs, strict=True):
            z0 += w0[slot] * x
            z1 += w1[slot] * x
            z2 += w2[slot] * x
        t = self.temperature
        v0, v1, v2 = z0 / t, z1 / t, z2 / t
        peak = max(v0, v1, v2)
        exp = [math.exp(v0 - peak), math.exp(v1 - peak), math.exp(v2 - peak)]
        norm = sum(exp)
        probs = [e / norm for e in exp]
        top_i = max(range(_NL), key=probs.__getitem__)
        scores = dict(zip(LABELS, probs, strict=True))
        top: list[tuple[str, float]] = []
        if explain:
            cs = list(map(mul, xs, map(self._margins[top_i].__getitem__, slots)))
            if names and names[0] == "bias":
                cs[0] = 0.0  # the bias explains nothing
            ranked = sorted(cs, reverse=True)
            # Name only the features that can make the cut: those at least as
            # strong as the explain-th (ties are then ordered by name).
            cut = ranked[explain - 1] if 0 < explain <= len(ranked) else 0.0
            keep = map(ge, cs, repeat(cut)) if cut > 0 else map(gt, cs, repeat(0.0))
            contrib: list[tuple[float, str]] = []
            for i in compress(range(len(cs)), keep):
                if i >= lex_start:
                    name = "lex:" + lex_found[i - lex_start]
                elif i >= shape_start:
                    name = "shape:" + shape_found[i - shape_start]
                else:
                    name = names[i]
                contrib.append((-cs[i], name))
            contrib.sort()  # strongest first, then by name
            top = [(name, round(-c, 4)) for c, name in contrib[:explain]]
        return LABELS[top_i], probs[top_i], scores, top

    def features(self, text: str, subject: str = "") -> FeatureList:
        """Return the feature list of a message (runs the rule cue scan)."""
        hits, _ = self._rules.analyse(text, subject=subject)
        return extract(text, hits, subject=subject)

    def predict(
        self, text: str, subject: str = "", language: str | None = None
    ) -> tuple[str, float, dict[str, float], list[tuple[str, float]]]:
        """Return (label, confidence, scores, top_features) for a message.

        `language` is accepted for symmetry with the classifiers; the features
        are the same for every language (mixed text gets both kinds).
        """
        text = text or ""
        subject = subject or ""
        hits, _ = self._rules.analyse(text, subject=subject)
        return self.predict_hits(text, hits, subject=subject)

    # -- persistence
    def save(self, path: str | Path) -> None:
        """Write the model: magic, JSON header, zlib(indices uint32 + weights float32)."""
        idxs = sorted(self.weights)
        ia = array("I", idxs)
        wa = array("f", [w for i in idxs for w in self.weights[i]])
        if sys.byteorder != "little":
            ia.byteswap()
            wa.byteswap()
        header = dict(self.meta)
        header.update(
            {
                "format": 1,
                "labels": list(LABELS),
                "bits": _BITS,
                "temperature": self.temperature,
                "n_weights": len(idxs),
                "version": self.version,
            }
        )
        hb = json.dumps(header, ensure_ascii=False, sort_keys=True).encode("utf-8")
        body = zlib.compress(ia.tobytes() + wa.tobytes(), 9)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(_MAGIC + struct.pack("<I", len(hb)) + hb + body)

    @classmethod
    def load(cls, path: str | Path | None = None) -> IntentModel:
        """Read a model written by `save`; None reads the shipped default."""
        data = Path(path if path is not None else DEFAULT_MODEL_PATH).read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError(f"{path}: not an omnirouter intent model")
        off = len(_MAGIC)
        (hlen,) = struct.unpack_from("<I", data, off)
        header = json.loads(data[off + 4 : off + 4 + hlen])
        if tuple(header["labels"]) != LABELS or header["bits"] != _BITS:
            raise ValueError(f"{path}: model labels or feature layout differ from this code")
        raw = zlib.decompress(data[off + 4 + hlen :])
        n = header["n_weights"]
        ia = array("I")
        ia.frombytes(raw[: 4 * n])
        wa = array("f")
        wa.frombytes(raw[4 * n :])
        if sys.byteorder != "little":
            ia.byteswap()
            wa.byteswap()
        it = iter(wa)
        weights = dict(zip(ia, zip(it, it, it, strict=True), strict=True))
        meta = {
            k: v
            for k, v in header.items()
            if k not in ("format", "labels", "bits", "temperature", "n_weights", "version")
        }
        model = cls(weights, temperature=header["temperature"], meta=meta)
        return model


# -- records ---------------------------------------------------------------------
_CAR_SCRAPES = (
    "1518872490/githw",
    "David-YYJ/DataEngine",
    "domino-hu/Data-Engine-lesson2-hujianzhao",
    "sodagreen-qf/hack_exercise1",
    "svwyaojiong/L1",
    "wo580/BI-",
    "chenghz2007/L1chz",
)
_SOURCE_NAMES = {
    "Semeval2019Task9/Subtask-A": "semeval",
    "nlbse2024/issue-report-classification": "nlbse",
    "danielpreotiuc/complaints-social-media": "tweets",
    "tisha-uwu/generative_text_chatbot": "bitext",
    "SophonPlus/ChineseNlpCorpus": "shopping",
    "PolyAI-LDN/task-specific-datasets": "banking77",
    "thu-coai/CrossWOZ": "crosswoz",
}


def source_group(source: str) -> str:
    """Return the source a record belongs to, by the data README's `source` prefixes."""
    if not source:
        return "unknown"
    if source.startswith("github-issue:"):
        return "github-zh"
    if source == "omnirouter-authored":
        return "authored"
    repo = source.split(":", 1)[0].split("@", 1)[0]
    if repo in _CAR_SCRAPES:
        return "chezhiwang"
    return _SOURCE_NAMES.get(repo, repo)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read labelled JSON lines (text, label, optional lang/source); check every line."""
    out: list[dict[str, Any]] = []
    p = Path(path)
    with p.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}:{n}: not JSON: {exc.msg}") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise ValueError(f"{p}:{n}: needs a string 'text'")
            if rec.get("label") not in LABELS:
                raise ValueError(f"{p}:{n}: label must be one of {', '.join(LABELS)}")
            rec.setdefault("lang", detect_language(rec["text"]))
            rec.setdefault("source", "")
            out.append(rec)
    return out


def shipped_extra_records() -> list[dict[str, Any]]:
    """Return the project's own labelled examples (router/models/extra_*.jsonl)."""
    out: list[dict[str, Any]] = []
    for path in sorted(EXTRA_DATA_DIR.glob("extra_*.jsonl")):
        out.extend(read_records(path))
    return out


# Per-item weight caps (before normalising): the project's own examples and agent
# corrections may weigh up to OWN_CAP each; an item of a tiny source from the pool
# (the Chinese GitHub suggestions) up to POOL_CAP, so 70 titles from one domain do
# not tilt every Chinese message towards "suggestion".
OWN_CAP = 10.0
POOL_CAP = 4.0


def sample_weights(
    records: Sequence[dict[str, Any]], *, cap: float | None = None, pool_cap: float | None = None
) -> list[float]:
    """Return per-record weights: each label, and each source inside it, weighs the same.

    A record weighs at most `cap` (default OWN_CAP), or `pool_cap` (default
    POOL_CAP) when it comes from the pool rather than the project or an agent.
    Records whose source is "correction" (agent relabels) count double on top.
    """
    own_cap = OWN_CAP if cap is None else cap
    pool_cap = min(own_cap, POOL_CAP if pool_cap is None else pool_cap)
    by_label: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        by_label[r["label"]][source_group(r.get("source", ""))] += 1
    total = len(records)
    labels_present = len(by_label)
    out = []
    for r in records:
        groups = by_label[r["label"]]
        g = source_group(r.get("source", ""))
        w = total / labels_present / len(groups) / groups[g]
        w = min(w, own_cap if g in ("authored", "correction") else pool_cap)
        if g == "correction":
            w *= 2.0
        out.append(w)
    mean = sum(out) / len(out)
    return [w / mean for w in out]


# -- training ------------------------------------------------------------------------
def _featurise(records: Sequence[dict[str, Any]]) -> list[list[tuple[int, float]]]:
    rules = RuleClassifier()
    out = []
    for r in records:
        hits, _ = rules.analyse(r["text"], subject=r.get("subject", ""))
        feats = extract(r["text"], hits, subject=r.get("subject", ""))
        out.append([(i, x) for i, x, _ in feats])
    return out


def _ftrl(
    data: Sequence[list[tuple[int, float]]],
    ys: Sequence[int],
    sws: Sequence[float],
    *,
    seed: int,
    epochs: int,
    reg: dict[str, tuple[float, float, float, float]],
) -> dict[int, tuple[float, float, float]]:
    """Fit the softmax regression with FTRL-proximal; return the non-zero weights."""
    params = [reg[name] for name in _GROUP_NAMES]
    z: dict[int, list[float]] = {}
    nn: dict[int, list[float]] = {}
    order = list(range(len(data)))
    rng = random.Random(seed)
    sqrt = math.sqrt
    exp = math.exp
    for _ in range(epochs):
        rng.shuffle(order)
        for j in order:
            feats = data[j]
            ws = []
            logit0 = logit1 = logit2 = 0.0
            for idx, x in feats:
                zi = z.get(idx)
                if zi is None:
                    zi = z[idx] = [0.0, 0.0, 0.0]
                    nn[idx] = [0.0, 0.0, 0.0]
                ni = nn[idx]
                w = _ftrl_weights(zi, ni, params[idx >> _BITS])
                ws.append(w)
                logit0 += w[0] * x
                logit1 += w[1] * x
                logit2 += w[2] * x
            top = max(logit0, logit1, logit2)
            e0, e1, e2 = exp(logit0 - top), exp(logit1 - top), exp(logit2 - top)
            s = e0 + e1 + e2
            y = ys[j]
            sw = sws[j]
            g = [(e0 / s - (y == 0)) * sw, (e1 / s - (y == 1)) * sw, (e2 / s - (y == 2)) * sw]
            for (idx, x), w in zip(feats, ws, strict=True):
                zi = z[idx]
                ni = nn[idx]
                alpha = params[idx >> _BITS][0]
                for k in (0, 1, 2):
                    gk = g[k] * x
                    if gk:
                        n_old = ni[k]
                        n_new = n_old + gk * gk
                        sigma = (sqrt(n_new) - sqrt(n_old)) / alpha
                        zi[k] += gk - sigma * w[k]
                        ni[k] = n_new
    weights: dict[int, tuple[float, float, float]] = {}
    for idx, zi in z.items():
        w = _ftrl_weights(zi, nn[idx], params[idx >> _BITS])
        if any(w):
            # Rounded to float32 now, so a saved and reloaded model predicts the same.
            weights[idx] = struct.unpack("<3f", struct.pack("<3f", *w))
    return weights


def _ftrl_weights(
    zi: list[float], ni: list[float], group: tuple[float, float, float, float]
) -> list[float]:
    """Return FTRL-Proximal's per-class weights from its accumulators (zero inside L1)."""
    alpha, beta, l1, l2 = group
    w = [0.0, 0.0, 0.0]
    for k in (0, 1, 2):
        zk = zi[k]
        if zk > l1 or zk < -l1:
            w[k] = -(zk - (l1 if zk > 0 else -l1)) / ((beta + math.sqrt(ni[k])) / alpha + l2)
    return w


def _bake_rules(
    weights: dict[int, tuple[float, float, float]], rule_weight: float
) -> dict[int, tuple[float, float, float]]:
    """Return weights that add `rule_weight` x the rule classifier's logits to the model's.

    The learned weights only correct the rules where the training data says so;
    out of the training domains the rules keep a fixed say. The rule logits are
    the cue sums ("rule:<label>" features carry sum/4) plus the rules' prior (bias).
    """
    if not rule_weight:
        return weights
    out = dict(weights)
    for k, label in enumerate(LABELS):
        idx = _hash(G_RULE, f"rule:{label}")
        w = list(out.get(idx, (0.0, 0.0, 0.0)))
        w[k] += 4.0 * rule_weight
        out[idx] = tuple(w)  # type: ignore[assignment]
    bias = _hash(G_RULE, "bias")
    w = list(out.get(bias, (0.0, 0.0, 0.0)))
    for k, label in enumerate(LABELS):
        w[k] += rule_weight * PRIOR[label]
    out[bias] = tuple(w)  # type: ignore[assignment]
    return {i: struct.unpack("<3f", struct.pack("<3f", *w)) for i, w in out.items()}


def fit_temperature(logits: Sequence[Sequence[float]], ys: Sequence[int]) -> float:
    """Return the temperature minimising the negative log-likelihood (grid + refinement)."""

    def nll(t: float) -> float:
        total = 0.0
        for z, y in zip(logits, ys, strict=True):
            top = max(z)
            lse = top / t + math.log(sum(math.exp((v - top) / t) for v in z))
            total += lse - z[y] / t
        return total

    best_t, best = 1.0, nll(1.0)
    for t in [0.3 + 0.1 * i for i in range(48)]:
        v = nll(t)
        if v < best:
            best_t, best = t, v
    step = 0.05
    for _ in range(12):
        for cand in (best_t - step, best_t + step):
            if cand > 0.05:
                v = nll(cand)
                if v < best:
                    best_t, best = cand, v
        step /= 2
    return round(best_t, 4)


def stratified_split(
    records: Sequence[dict[str, Any]], *, test_share: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Return (train, test) indices, stratified by source and label."""
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        cells[(source_group(r.get("source", "")), r["label"])].append(i)
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for key in sorted(cells):
        idx = cells[key][:]
        rng.shuffle(idx)
        k = round(len(idx) * test_share)
        if len(idx) >= 2:
            k = max(1, k)
        test.extend(idx[:k])
        train.extend(idx[k:])
    return sorted(train), sorted(test)


def train(
    records: Sequence[dict[str, Any]],
    *,
    seed: int = 13,
    epochs: int = DEFAULT_EPOCHS,
    reg: dict[str, tuple[float, float, float, float]] | None = None,
    calibrate: bool = True,
    include_extra: bool = True,
    rule_weight: float = DEFAULT_RULE_WEIGHT,
    log: Any = None,
) -> IntentModel:
    """Train an IntentModel on labelled records (text, label, optional lang/source).

    The project's own examples (router/models/extra_*.jsonl) are added unless
    `include_extra` is False. With `calibrate`, a first model is trained on 85%
    (stratified), its temperature fitted on the other 15%, then the final model
    is trained on everything and given that temperature. Same records and seed,
    same model.
    """
    reg = {**DEFAULT_REG, **(reg or {})}
    recs = list(records) + (shipped_extra_records() if include_extra else [])
    if not recs:
        raise ValueError("no training records")
    started = time.perf_counter()
    data = _featurise(recs)
    ys = [_LABEL_INDEX[r["label"]] for r in recs]
    sws = sample_weights(recs)
    temperature = 1.0
    if calibrate and len(recs) >= 50:
        tr, ho = stratified_split(recs, test_share=0.15, seed=seed)
        sub_recs = [recs[i] for i in tr]
        sub_w = sample_weights(sub_recs)
        w0 = _ftrl(
            [data[i] for i in tr], [ys[i] for i in tr], sub_w, seed=seed, epochs=epochs, reg=reg
        )
        probe = IntentModel(_bake_rules(w0, rule_weight))
        temperature = fit_temperature(
            [probe.logits([(i, x, "") for i, x in data[j]]) for j in ho], [ys[j] for j in ho]
        )
        if log:
            log(f"temperature {temperature} fitted on {len(ho)} held-out records")
    weights = _bake_rules(_ftrl(data, ys, sws, seed=seed, epochs=epochs, reg=reg), rule_weight)
    counts = Counter(f"{r['label']}/{r.get('lang', '?')}" for r in recs)
    sources = Counter(source_group(r.get("source", "")) for r in recs)
    meta = {
        "trained_on": dict(sorted(counts.items())),
        "sources": dict(sorted(sources.items())),
        "seed": seed,
        "epochs": epochs,
        "rule_weight": rule_weight,
        "reg": {k: list(v) for k, v in reg.items()},
    }
    if log:
        log(f"trained on {len(recs)} records in {time.perf_counter() - started:.1f}s")
    return IntentModel(weights, temperature=temperature, meta=meta)


# -- evaluation --------------------------------------------------------------------------
def _prf(gold: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    per: dict[str, dict[str, float]] = {}
    for label in LABELS:
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, pred, strict=True))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[label] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
    present = [lb for lb in LABELS if per[lb]["support"]]
    macro = sum(per[lb]["f1"] for lb in present) / len(present) if present else 0.0
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred, strict=True)) / n if n else 0.0
    confusion = {g: {p: 0 for p in LABELS} for g in LABELS}
    for g, p in zip(gold, pred, strict=True):
        confusion[g][p] += 1
    return {"n": n, "accuracy": acc, "macro_f1": macro, "per_class": per, "confusion": confusion}


def calibration(
    confs: Sequence[float], correct: Sequence[bool], *, bins: int = 10
) -> dict[str, Any]:
    """Return the expected calibration error and a reliability table."""
    table = []
    ece = 0.0
    n = len(confs)
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confs) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if not idx:
            continue
        mc = sum(confs[i] for i in idx) / len(idx)
        acc = sum(correct[i] for i in idx) / len(idx)
        ece += len(idx) / n * abs(mc - acc)
        table.append(
            {"bin": f"{lo:.1f}-{hi:.1f}", "n": len(idx), "confidence": mc, "accuracy": acc}
        )
    return {"ece": ece, "table": table}


def evaluate(model: Any, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return figures for `model` (an IntentModel or anything with .predict) on records.

    {"overall": {...}, "by_lang": {lang: {...}}, "by_source": {source: {...}},
    "calibration": {"ece", "table"}}; each {...} has n, accuracy, macro_f1,
    per_class (precision, recall, f1, support) and confusion (gold -> predicted).
    """
    gold = [r["label"] for r in records]
    preds = []
    confs = []
    for r in records:
        label, conf, _, _ = model.predict(r["text"], r.get("subject", ""), r.get("lang"))
        preds.append(label)
        confs.append(conf)
    by_lang: dict[str, list[int]] = defaultdict(list)
    by_src: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_lang[r.get("lang") or detect_language(r["text"])].append(i)
        by_src[source_group(r.get("source", ""))].append(i)

    def sub(idx: list[int]) -> dict[str, Any]:
        return _prf([gold[i] for i in idx], [preds[i] for i in idx])

    return {
        "model_version": getattr(model, "version", "?"),
        "overall": _prf(gold, preds),
        "by_lang": {k: sub(v) for k, v in sorted(by_lang.items())},
        "by_source": {k: sub(v) for k, v in sorted(by_src.items())},
        "calibration": calibration(confs, [g == p for g, p in zip(gold, preds, strict=True)]),
        "predictions": preds,
    }


def format_report(name: str, rep: dict[str, Any]) -> str:
    """Return a printable table for one evaluate() slice."""
    lines = [
        f"{name}: n={rep['n']}  accuracy={rep['accuracy']:.3f}  macro-F1={rep['macro_f1']:.3f}",
        f"  {'class':<11}{'precision':>10}{'recall':>9}{'F1':>8}{'support':>9}",
    ]
    for label, m in rep["per_class"].items():
        lines.append(
            f"  {label:<11}{m['precision']:>10.3f}{m['recall']:>9.3f}{m['f1']:>8.3f}"
            f"{m['support']:>9}"
        )
    lines.append("  confusion (rows gold, columns predicted)")
    lines.append("  " + " " * 11 + "".join(f"{p:>11}" for p in LABELS))
    for g in LABELS:
        lines.append(f"  {g:<11}" + "".join(f"{rep['confusion'][g][p]:>11}" for p in LABELS))
    return "\n".join(lines)


# -- the classifier the pipeline can swap in -------------------------------------------
class ModelClassifier:
    """`RuleClassifier`'s interface, labelled by the trained model.

    The label, confidence and scores come from the model (which sees the rule
    cues among its features); signals, their spans and the severity come from
    the rules (`severity_for` on the model's label).
    """

    def __init__(
        self,
        model: IntentModel | None = None,
        *,
        amount_threshold: float = 5000.0,
        vip_contacts: frozenset[str] = frozenset(),
        model_path: str | Path | None = None,
    ) -> None:
        self.model = model if model is not None else IntentModel.load(model_path)
        self.rules = RuleClassifier(amount_threshold=amount_threshold, vip_contacts=vip_contacts)
        self.model_version = self.model.version

    def signals(self, text: str, *, contact: str = "") -> list[Any]:
        """Return the escalation signals in `text` (as RuleClassifier.signals)."""
        return self.rules.signals(text, contact=contact)

    def classify(
        self, text: str, *, subject: str = "", language: str | None = None, contact: str = ""
    ) -> Classification:
        """Return label, scores, severity and signals for a message (spans index `text`)."""
        text = text or ""
        hits, signals = self.rules.analyse(text, subject=subject, contact=contact)
        label, conf, scores, top = self.model.predict_hits(text, hits, subject=subject)
        if language is None:
            language = detect_language(f"{subject}\n{text}" if subject else text)
        return Classification(
            label=label,
            confidence=conf,
            scores=scores,
            severity=severity_for(label, signals),
            signals=tuple(signals),
            language=language,
            model_version=self.model_version,
            features=tuple(top),
        )


# -- commands -----------------------------------------------------------------------------
def _load_many(paths: Iterable[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in paths:
        out.extend(read_records(p))
    return out


def train_command(argv: list[str]) -> int:
    """`omnirouter classifier train --data F.jsonl [--data ...] --out MODEL [--seed N]
    [--corrections F.jsonl] [--no-extra]`."""
    ap = argparse.ArgumentParser(prog="omnirouter classifier train")
    ap.add_argument("--data", action="append", required=True, help="labelled JSON lines")
    ap.add_argument("--out", required=True, help="where to write the model")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--corrections", action="append", default=[], help="agent relabels")
    ap.add_argument("--no-extra", action="store_true", help="leave out the project's own examples")
    args = ap.parse_args(argv)
    try:
        records = _load_many(args.data)
        for path in args.corrections:
            for r in read_records(path):
                r["source"] = "correction"
                records.append(r)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = train(
        records,
        seed=args.seed,
        epochs=args.epochs,
        include_extra=not args.no_extra,
        log=lambda m: print(m, file=sys.stderr),
    )
    model.save(args.out)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {model.version}, {len(model.weights)} weights, {size} bytes")
    return 0


def eval_command(argv: list[str]) -> int:
    """`omnirouter classifier eval --data F.jsonl [--model MODEL] [--loso] [--split]`."""
    ap = argparse.ArgumentParser(prog="omnirouter classifier eval")
    ap.add_argument("--data", action="append", required=True, help="labelled JSON lines")
    ap.add_argument("--model", help="model file (default: the shipped model)")
    ap.add_argument("--split", action="store_true", help="train on 80%%, test on 20%% (stratified)")
    ap.add_argument("--loso", action="store_true", help="leave one source out, train and test")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    try:
        records = _load_many(args.data)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {}
    if not args.split and not args.loso:
        model = IntentModel.load(args.model)
        rep = evaluate(model, records)
        rep.pop("predictions")
        out["model"] = rep
        if not args.json:
            print(f"model {model.version} on {len(records)} records")
            _print_eval(rep)
    if args.split:
        tr, te = stratified_split(records, seed=args.seed)
        model = train([records[i] for i in tr], seed=args.seed)
        rep = evaluate(model, [records[i] for i in te])
        rep.pop("predictions")
        out["split"] = rep
        if not args.json:
            print(f"stratified split: trained on {len(tr)}, tested on {len(te)}")
            _print_eval(rep)
    if args.loso:
        out["loso"] = loso(records, seed=args.seed, log=None if args.json else print)
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=1))
    return 0


def _print_eval(rep: dict[str, Any]) -> None:
    print(format_report("overall", rep["overall"]))
    for lang, r in rep["by_lang"].items():
        print(format_report(f"lang={lang}", r))
    print("per source:")
    for src, r in rep["by_source"].items():
        print(
            f"  {src:<12} n={r['n']:>5}  accuracy={r['accuracy']:.3f}  macro-F1={r['macro_f1']:.3f}"
        )
    cal = rep["calibration"]
    print(f"calibration: ECE={cal['ece']:.3f}")
    for row in cal["table"]:
        print(
            f"  conf {row['bin']}  n={row['n']:>5}  mean conf={row['confidence']:.3f}"
            f"  accuracy={row['accuracy']:.3f}"
        )


def loso(
    records: Sequence[dict[str, Any]], *, seed: int = 13, log: Any = print, **kw: Any
) -> dict[str, Any]:
    """Leave one source out: train without it, test on it; return accuracy per source."""
    groups = sorted({source_group(r.get("source", "")) for r in records})
    per: dict[str, dict[str, Any]] = {}
    for g in groups:
        tr = [r for r in records if source_group(r.get("source", "")) != g]
        te = [r for r in records if source_group(r.get("source", "")) == g]
        model = train(tr, seed=seed, calibrate=False, **kw)
        rep = evaluate(model, te)
        dist = Counter(rep["predictions"])
        per[g] = {
            "n": len(te),
            "accuracy": rep["overall"]["accuracy"],
            "predicted": {lb: dist.get(lb, 0) for lb in LABELS},
            "gold": dict(Counter(r["label"] for r in te)),
        }
        if log:
            log(
                f"  held out {g:<12} n={len(te):>5}  accuracy={per[g]['accuracy']:.3f}  "
                f"predicted {per[g]['predicted']}"
            )
    accs = [v["accuracy"] for v in per.values()]
    result = {"per_source": per, "mean": sum(accs) / len(accs), "min": min(accs)}
    if log:
        log(f"LOSO mean accuracy {result['mean']:.3f}, lowest {result['min']:.3f}")
    return result
