"""Time `CrisisDetector.observe` (router/crisis.py): microseconds per message.

Usage: python bench/crisis_bench.py [--messages 10000] [--seed 1]

Feeds a seeded stream of classified messages (half Chinese, half English; 60%
complaints; random subjects from a large vocabulary, so clusters form but
collide rarely) at ~20 messages a second of simulated time, then repeats the run with
a complaint spike and a same-subject burst in the middle. Prints µs per
observe() (mean, p50, p99, max), the events emitted, and the detector's
structure sizes. All texts are generated here.
"""

from __future__ import annotations

import argparse
import random
import time

from router.crisis import CrisisConfig, CrisisDetector

# A vocabulary as varied as real subjects: 3,000 Han characters, 2,000 words.
ZH = "".join(chr(0x4E00 + i * 7) for i in range(3000))
EN = [f"w{i}" for i in range(2000)]


def stream(n: int, seed: int, burst: bool) -> list[tuple[str, str, str, str, str, float]]:
    rng = random.Random(seed)
    out = []
    t = 1_700_000_000.0
    for i in range(n):
        t += rng.expovariate(20)
        if burst and n // 2 <= i < n // 2 + 400:
            subject = "小区今天停水了，什么时候恢复？"  # one subject, many customers
            label = "complaint"
        elif rng.random() < 0.5:
            subject = "".join(rng.choice(ZH) for _ in range(rng.randint(4, 14)))
            label = rng.choice(("complaint", "complaint", "complaint", "inquiry", "suggestion"))
        else:
            subject = " ".join(rng.choice(EN) for _ in range(rng.randint(2, 6)))
            label = rng.choice(("complaint", "complaint", "complaint", "inquiry", "suggestion"))
        text = subject + "，" + "详细描述" * rng.randint(1, 20)
        out.append((f"m{i}", f"c{rng.randrange(100_000)}", label, text, subject, t))
    return out


def run(n: int, seed: int, burst: bool) -> None:
    msgs = stream(n, seed, burst)
    det = CrisisDetector(CrisisConfig(), clock=lambda: msgs[0][5])
    det.prime(int(20 * 0.6 * 3600), 3600)  # the store's last hour: 20 msg/s, 60% complaints
    costs = []
    events = []
    observe = det.observe
    perf = time.perf_counter_ns
    for mid, contact, label, text, subject, at in msgs:
        t0 = perf()
        events += observe(mid, contact, label, "P2", text, subject, at)
        costs.append(perf() - t0)
    costs.sort()
    us = [c / 1000 for c in costs]
    print(
        f"{'with burst' if burst else 'steady':<11} n={n}  mean={sum(us) / n:6.1f} µs  "
        f"p50={us[n // 2]:6.1f}  p99={us[int(n * 0.99)]:6.1f}  max={us[-1]:7.1f}  "
        f"events={[(e.kind, e.reason) for e in events]}"
    )
    print(f"            sizes {det.sizes()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    run(args.messages, args.seed, burst=False)
    run(args.messages, args.seed, burst=True)


if __name__ == "__main__":
    main()
