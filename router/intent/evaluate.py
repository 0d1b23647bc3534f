"""Evaluating an intent model: per-class figures, calibration, leave-one-source-out."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from router.classify import detect_language
from router.intent.data import source_group
from router.intent.train import train
from router.model import LABELS


def _prf(gold: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """Return n, accuracy, macro-F1, per-class figures and the confusion table."""
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
