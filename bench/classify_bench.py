"""Benchmark ModelClassifier.classify (the shipped model) against RuleClassifier on one core.

Usage: python bench/classify_bench.py [--data path/to/train.jsonl] [--seconds 5] [--model M]

Prints: model load time, artifact size, messages/s and latency percentiles through
classify() for both classifiers (and their ratio), and the process RSS before and
after loading. The messages are the pool's texts when it is there (../shared);
otherwise a fixed set of messages written here, repeated.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "classify" / "train.jsonl"
FALLBACK = [
    "What time do you open on Sunday?",
    "请问你们周末营业到几点？",
    "My parcel arrived broken and nobody answers my emails, I want a refund!",
    "洗衣机用了两天就坏了，售后一直不理，太失望了",
    "It would be great if the app had a dark mode",
    "建议在订单页面增加一键复制单号的按钮",
    "我的order还没到，请问什么时候deliver？",
]


def rss_mb() -> float:
    """Return the current resident set size in MB (Linux /proc, else peak RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(clf, texts: list[str], seconds: float) -> dict[str, float]:
    """Classify texts round-robin for about `seconds`; return rate and latency figures."""
    for t in texts[:200]:  # warm up
        clf.classify(t)
    lat: list[float] = []
    n = 0
    perf = time.perf_counter
    start = perf()
    deadline = start + seconds
    while perf() < deadline:
        for t in texts:
            t0 = perf()
            clf.classify(t)
            lat.append(perf() - t0)
            n += 1
            if n % 500 == 0 and perf() >= deadline:
                break
    elapsed = perf() - start
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000

    return {
        "n": n,
        "per_s": n / elapsed,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": lat[-1] * 1000,
    }


def main(argv: list[str]) -> int:
    """Run the benchmark and print the figures."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)

    rss0 = rss_mb()
    from router.classify import RuleClassifier
    from router.intent import DEFAULT_MODEL_PATH, IntentModel, ModelClassifier

    path = Path(args.model) if args.model else DEFAULT_MODEL_PATH
    rss1 = rss_mb()
    t0 = time.perf_counter()
    model = IntentModel.load(path)
    load_s = time.perf_counter() - t0
    rss2 = rss_mb()

    data = Path(args.data)
    if data.is_file():
        texts = [json.loads(line)["text"] for line in data.read_text(encoding="utf-8").splitlines()]
        source = f"{data} ({len(texts)} texts)"
    else:
        texts = FALLBACK * 50
        source = f"{len(FALLBACK)} built-in messages (pool not found at {data})"
    mean_len = sum(map(len, texts)) / len(texts)

    print(f"model:     {path} ({model.version}, {len(model.weights)} weights)")
    print(f"artifact:  {path.stat().st_size / 1024:.0f} KiB")
    print(f"load:      {load_s * 1000:.0f} ms")
    print(
        f"RSS:       {rss0:.0f} MB at start, {rss1:.0f} MB after imports, "
        f"{rss2:.0f} MB after loading the model (+{rss2 - rss1:.0f} MB)"
    )
    print(f"messages:  {source}, mean {mean_len:.0f} chars; one core, {args.seconds:.0f}s each\n")

    rules = run(RuleClassifier(), texts, args.seconds)
    mc = run(ModelClassifier(model), texts, args.seconds)
    long_texts = [t[:200] for t in texts if len(t) >= 200] or [(t * 20)[:200] for t in texts[:100]]
    mc_long = run(ModelClassifier(model), long_texts, args.seconds / 2)
    for name, r in (
        ("RuleClassifier", rules),
        ("ModelClassifier", mc),
        ("ModelClassifier, 200-char", mc_long),
    ):
        print(
            f"{name:<26} {r['per_s']:>9,.0f} msg/s  p50 {r['p50_ms']:.3f} ms  "
            f"p99 {r['p99_ms']:.3f} ms  max {r['max_ms']:.2f} ms  (n={r['n']:,})"
        )
    print(f"\nModelClassifier / RuleClassifier throughput: {mc['per_s'] / rules['per_s']:.2f}x")
    ok = mc["per_s"] >= 1000 and mc["p99_ms"] < 50 and load_s < 2.0
    print(f"targets (>= 1,000 msg/s, p99 < 50 ms, load < 2 s): {'met' if ok else 'NOT met'}")
    print(f"RSS at end: {rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
