"""The intent model's weights and inference: `IntentModel` (scoring, explanation, file format).

Pure Python (no numpy): a multinomial logistic regression over the hashed sparse
features of features.py, calibrated by a temperature. `predict_hits` is the ingest
hot path; its result equals scoring `extract`'s feature list (tests pin that).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import struct
import sys
import zlib
from array import array
from itertools import compress, repeat
from operator import and_, ge, gt, mul, or_
from pathlib import Path
from typing import Any, NamedTuple

from router.classify import PRIOR, RuleClassifier
from router.intent.features import (
    BITS,
    EN_FUNCTION,
    G_CUE,
    G_LEX,
    G_RULE,
    G_SHAPE,
    MASK,
    MEMO_MAX,
    MINE_RE,
    NEG_RE,
    NENG_AFTER,
    NENG_BEFORE,
    PAST_RE,
    RULE_CLIP,
    YOU_RE,
    ZH_FUNCTION,
    FeatureList,
    extract,
    feature_hash,
    tokens,
)
from router.model import LABELS

# The shipped model (package data, see pyproject's package-data).
DEFAULT_MODEL_PATH = Path(__file__).resolve().parent.parent / "models" / "intent.bin"
_MAGIC = b"OMNIRTR-INTENT\x01\n"
_NL = len(LABELS)


# -- the model --------------------------------------------------------------------
# The shape view as lookups: token -> itself for the tokens features._is_function keeps
# (tokens with an apostrophe are kept too, see predict_hits), and every n-gram
# (n <= 3) made of register marks only, which extract leaves out.
_SHAPE_OF = {t: t for t in EN_FUNCTION | ZH_FUNCTION | {"?", "!", ",", "0", "@u", "<url>"}}
_REGISTER_GRAMS = frozenset(
    " ".join(g) for n in (1, 2, 3) for g in itertools.product(("^", "$", "X", ","), repeat=n)
)
_JOIN = " ".join
_PREFIX_CRC = {G_SHAPE: zlib.crc32(b"shape:"), G_LEX: zlib.crc32(b"lex:")}
_MARKS = ("q", "neg", "mine", "you", "past")  # the style marks, in extract's order


class Assessment(NamedTuple):
    """A prediction with how much of the text the model knew (see `IntentModel.assess`)."""

    label: str
    confidence: float
    scores: dict[str, float]
    top: list[tuple[str, float]]
    known_words: int  # the text's words and word pairs the model has weights for


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
        # explanations are ranked by: the weight towards a label minus the mean
        # of the others). Memos of known feature names (without
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
                # The expression of the reference scoring (tests/test_intent.py), so
                # contributions are bit-identical to it.
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

    def _lookup(self, group: int, name: str, key: str, memo: dict[str, int]) -> int:
        """Memoise and return the slot of feature `name` (memo key `key`), -1 if unknown."""
        slot = memo[key] = self._slots.get(feature_hash(group, name), -1)
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
            # crc32 of "prefix:" + name, as feature_hash, continuing from the prefix's crc.
            crcs = map(zlib.crc32, map(str.encode, rest), repeat(_PREFIX_CRC[group]))
            idxs = map(or_, map(and_, crcs, repeat(MASK)), repeat(group << BITS))
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
                    named.append((f"rule:{label}", min(sums[label], RULE_CLIP) / 4.0))
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
        """Return label, confidence, scores and top features for a message and its cue hits."""
        label, confidence, scores, top, _ = self.assess(
            text, hits, subject=subject, explain=explain
        )
        return label, confidence, scores, top

    def assess(
        self, text: str, hits: dict[str, tuple[str, float]], *, subject: str = "", explain: int = 5
    ) -> Assessment:
        """Return `predict_hits`'s answer and how many of the text's words the model knew.

        The result is, bit for bit, that of scoring `extract(text, hits,
        subject=subject)`: `logits`, a softmax at `temperature`, and the
        `explain` features with the largest value x (weight towards the top
        label - mean of the others), ties by name, the bias left out. That
        reference lives in tests/test_intent.py, which pins the two together.
        It is computed faster here (this is the ingest hot path): no feature
        list is built, feature names are looked up in memos instead of being
        hashed each time, features the model has no weights for are dropped
        before sorting (they add nothing), the rule group is memoised by its
        inputs, and names are built only for the features explained. The
        logits add the known features one by one in extract's order, so the
        float sums are those of `logits`.
        """
        # Bounded memos: the n-grams a long-running daemon meets are not. (Replaced,
        # not cleared, so that a call running meanwhile keeps consistent tables.)
        for i, memo in enumerate(self._ngram_memo):
            if len(memo) > MEMO_MAX:
                self._ngram_memo[i] = {}
        if len(self._rule_memo) > MEMO_MAX:
            self._rule_memo = {}
        # -- rule group: a function of the cue sums and the style marks, memoised
        sums = dict.fromkeys(LABELS, 0.0)
        for label, weight in hits.values():
            sums[label] += weight
        low = text.lower() if not subject else f"{subject} {text}".lower()
        flags = (
            bool(hits),
            "?" in low or "？" in low,
            NEG_RE.search(low) is not None,
            MINE_RE.search(low) is not None,
            YOU_RE.search(low) is not None,
            PAST_RE.search(low) is not None,
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
        toks = tokens(f"{subject} , {text}" if subject else text)
        if toks:
            mapped = list(map(_SHAPE_OF.get, toks, repeat("X")))
            if "'" in "".join(toks):
                mapped = [t if "'" in t else m for t, m in zip(toks, mapped, strict=True)]
            if "能" in toks:
                n = len(toks)
                for i, tok in enumerate(toks):
                    if tok == "能" and (
                        (i + 1 < n and toks[i + 1] in NENG_AFTER)
                        or (i and toks[i - 1] in NENG_BEFORE)
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
        # -- scoring (as logits and the reference softmax), feature by feature
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
        return Assessment(LABELS[top_i], probs[top_i], scores, top, len(lex_found))

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
                "bits": BITS,
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
        if tuple(header["labels"]) != LABELS or header["bits"] != BITS:
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
