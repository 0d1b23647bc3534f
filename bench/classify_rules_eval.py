"""Evaluate the rule classifier (router.classify.RuleClassifier) on the labelled pool.

Usage: python bench/classify_rules_eval.py [path/to/train.jsonl]

The default path is ../shared/data/classify/train.jsonl relative to the repo root.
Prints accuracy and macro-F1 overall, per language and per source, a confusion
matrix, figures for two fixed halves of the pool (the rules were tuned by looking
at errors in the "dev" half only; "held-out" is the other half), and the time per
classify() call. The rules were written from intent cues, but they were tuned on
this pool, so these figures are optimistic for other domains.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from router.classify import RuleClassifier
from router.model import LABELS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "classify" / "train.jsonl"

# The six scrapes of the same 车质网 complaint list are one source for reporting.
_CAR_SCRAPES = (
    "1518872490/githw",
    "David-YYJ/DataEngine",
    "domino-hu/Data-Engine-lesson2-hujianzhao",
    "sodagreen-qf/hack_exercise1",
    "svwyaojiong/L1",
    "wo580/BI-",
)


def source_group(source: str, label: str) -> str:
    """Return a short reporting name for a row's source (one name per source and label)."""
    if source.startswith("github-issue:"):
        return "github-issue (zh feature titles)"
    repo = source.split(":", 1)[0]
    if repo in _CAR_SCRAPES:
        return "车质网 car-complaint titles"
    if repo == "tisha-uwu/generative_text_chatbot":
        return f"Bitext ({label})"
    return repo


def is_dev(text: str) -> bool:
    """Return True for the fixed half of the pool used while tuning the rules."""
    return zlib.crc32(text.encode("utf-8")) % 2 == 0


def metrics(gold: Sequence[str], pred: Sequence[str]) -> tuple[float, float, dict[str, float]]:
    """Return accuracy, macro-F1 over the labels present in gold, and per-label F1."""
    n = len(gold)
    acc = sum(g == p for g, p in zip(gold, pred, strict=True)) / n if n else 0.0
    f1s: dict[str, float] = {}
    for label in LABELS:
        tp = sum(g == p == label for g, p in zip(gold, pred, strict=True))
        fp = sum(p == label != g for g, p in zip(gold, pred, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, pred, strict=True))
        if tp + fn == 0:
            continue  # label absent from this slice: leave it out of the macro average
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn)
        f1s[label] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    macro = sum(f1s.values()) / len(f1s) if f1s else 0.0
    return acc, macro, f1s


def report(name: str, gold: Sequence[str], pred: Sequence[str]) -> None:
    """Print one line of figures for a slice."""
    acc, macro, f1s = metrics(gold, pred)
    per = "  ".join(f"{k}={v:.3f}" for k, v in f1s.items())
    print(f"{name:<38} n={len(gold):>6}  acc={acc:.3f}  macroF1={macro:.3f}  F1: {per}")


def main(argv: Sequence[str]) -> int:
    """Run the evaluation and print the figures."""
    path = Path(argv[1]) if len(argv) > 1 else DEFAULT_DATA
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    clf = RuleClassifier()
    preds = [clf.classify(r["text"]).label for r in rows]
    gold = [r["label"] for r in rows]
    print(f"data: {path} ({len(rows)} rows)\n")

    report("overall", gold, preds)
    for lang in sorted({r["lang"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["lang"] == lang]
        report(f"lang={lang}", [gold[i] for i in idx], [preds[i] for i in idx])
    for half, want in (("dev half", True), ("held-out half", False)):
        idx = [i for i, r in enumerate(rows) if is_dev(r["text"]) == want]
        report(half, [gold[i] for i in idx], [preds[i] for i in idx])

    print("\nper source (single-label sources: acc = recall; predicted distribution)")
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        groups[f"{r['lang']} {source_group(r['source'], r['label'])}"].append(i)
    for name in sorted(groups):
        idx = groups[name]
        g = [gold[i] for i in idx]
        p = [preds[i] for i in idx]
        acc, _, _ = metrics(g, p)
        dist = Counter(p)
        shown = " ".join(f"{k}={dist.get(k, 0)}" for k in LABELS)
        print(f"  {name:<52} n={len(idx):>5}  gold={g[0]:<10} acc={acc:.3f}  pred: {shown}")

    print("\nconfusion (rows gold, columns predicted)")
    print(" " * 12 + "".join(f"{k:>12}" for k in LABELS))
    for g_label in LABELS:
        cells = "".join(
            f"{sum(1 for g, p in zip(gold, preds, strict=True) if g == g_label and p == k):>12}"
            for k in LABELS
        )
        print(f"{g_label:>12}{cells}")

    # Timing: whole pool, and messages of about 200 characters.
    texts = [r["text"] for r in rows]
    start = time.perf_counter()
    for t in texts:
        clf.classify(t)
    per_call = (time.perf_counter() - start) / len(texts) * 1e6
    long_texts = [t[:200] for t in texts if len(t) >= 200] or [(t * 20)[:200] for t in texts[:100]]
    reps = max(1, 20000 // len(long_texts))
    start = time.perf_counter()
    for _ in range(reps):
        for t in long_texts:
            clf.classify(t)
    per_long = (time.perf_counter() - start) / (reps * len(long_texts)) * 1e6
    mean_len = sum(map(len, texts)) / len(texts)
    print(f"\ntiming: {per_call:.1f} us/classify over the pool (mean {mean_len:.0f} chars);")
    print(f"        {per_long:.1f} us/classify on {len(long_texts)} texts cut to 200 chars")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
