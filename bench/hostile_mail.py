"""Cost of normalising hostile mails: thousands of header parameters, deep MIME nesting,
a huge HTML body.

Usage: python bench/hostile_mail.py [--repeat 3]

For each size (10 to 80,000 parameters on one Content-Type, then 200 parts with 2,000
parameters each on their Content-Disposition, multiparts nested 500 and 10,000 levels
deep, a 15 MB HTML-only body) it times `channels.email.normalise.normalise`
and, as the baseline in the same process, what the standard library alone does with the
same bytes: `email.message_from_bytes(raw, policy=email.policy.default)` followed by
the reads normalise needs (content type, charset, file names), each header parsed
afresh (normalise's cache of parsed headers is emptied before each run). Prints ms per mail for
both and their ratio; the baseline is skipped above 10,000 parameters (it takes seconds
to minutes there). One JSON line with every figure ends the output.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from channels.email import normalise as normalise_module
from channels.email.normalise import normalise

BASELINE_MAX_PARAMS = 10_000


def params(n: int, name: str = "p") -> str:
    return "".join(f"; {name}{i}=v{i}" for i in range(n))


def one_part(n: int) -> bytes:
    return (
        "From: a@example.com\r\nSubject: x\r\nContent-Type: text/plain; charset=utf-8"
        + params(n)
        + "\r\n\r\nhello there\r\n"
    ).encode()


def many_parts(parts: int, n: int) -> bytes:
    body = "".join(
        f"--B\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; "
        f"filename=a{k}.txt{params(n, 'q')}\r\n\r\nbody {k}\r\n"
        for k in range(parts)
    )
    return (
        "From: a@example.com\r\nSubject: x\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
        + body
        + "--B--\r\n"
    ).encode()


def nested(depth: int) -> bytes:
    levels = "".join(
        f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n" for i in range(depth)
    )
    return ("From: a@example.com\r\n" + levels + "Content-Type: text/plain\r\n\r\nhi\r\n").encode()


def html_body(paragraphs: int) -> bytes:
    html = "".join(f"<p>line {i} of <b>a long</b> report</p>" for i in range(paragraphs))
    return b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n" + html.encode()


def stdlib(raw: bytes) -> None:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    for part in msg.walk():
        part.get_content_type()
        part.get_param("charset")
        part.get_filename()


def best_ms(fn: object, raw: bytes, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        # Each header parsed afresh, as a mail with headers never seen before would be.
        cache = getattr(normalise_module, "_parsed_header", None)
        if cache is not None:
            cache.cache_clear()
        t0 = time.perf_counter()
        fn(raw)  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    cases = [(f"Content-Type, {n} parameters", one_part(n), n) for n in (10, 1_000, 10_000, 80_000)]
    cases.append(("200 parts x 2,000 disposition parameters", many_parts(200, 2_000), 2_000))
    cases += [(f"multipart nested {d} deep", nested(d), 0) for d in (500, 10_000)]
    cases.append(("HTML-only body, 400,000 paragraphs", html_body(400_000), 0))
    rows = []
    print(f"{'mail':44} {'KB':>8} {'normalise ms':>13} {'stdlib ms':>10} {'ratio':>7}")
    for label, raw, n in cases:
        ours = best_ms(normalise, raw, args.repeat)
        base = best_ms(stdlib, raw, 1) if n <= BASELINE_MAX_PARAMS and len(raw) < 200_000 else None
        ratio = base / ours if base else None
        rows.append({"mail": label, "bytes": len(raw), "normalise_ms": ours, "stdlib_ms": base})
        print(
            f"{label:44} {len(raw) / 1024:8.1f} {ours:13.1f} "
            f"{(f'{base:.1f}' if base else 'skipped'):>10} {(f'{ratio:.0f}x' if ratio else ''):>7}"
        )
    print(json.dumps({"bench": "hostile_mail", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
