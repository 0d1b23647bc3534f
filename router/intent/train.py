"""Training the intent model: per-record weights, FTRL-proximal, rule baking, temperature.

Training weights every example so that each label, and each source inside a
label, carries the same total weight, so one big or formulaic source cannot
dominate. FTRL-proximal gives per-coordinate adaptive steps with L1 and L2 per
feature group, so the weights are sparse and the artifact is small.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from router.classify import PRIOR, RuleClassifier
from router.intent.data import shipped_extra_records, source_group, stratified_split
from router.intent.features import BITS, G_RULE, GROUP_NAMES, extract, feature_hash
from router.intent.model import IntentModel
from router.model import LABELS

_LABEL_INDEX = {label: i for i, label in enumerate(LABELS)}

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


def _featurise(records: Sequence[dict[str, Any]]) -> list[list[tuple[int, float]]]:
    """Return each record's (index, value) features, names dropped (training needs none)."""
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
    params = [reg[name] for name in GROUP_NAMES]
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
                w = _ftrl_weights(zi, ni, params[idx >> BITS])
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
                alpha = params[idx >> BITS][0]
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
        w = _ftrl_weights(zi, nn[idx], params[idx >> BITS])
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
        idx = feature_hash(G_RULE, f"rule:{label}")
        w = list(out.get(idx, (0.0, 0.0, 0.0)))
        w[k] += 4.0 * rule_weight
        out[idx] = tuple(w)  # type: ignore[assignment]
    bias = feature_hash(G_RULE, "bias")
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
