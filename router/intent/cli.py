"""`omnirouter classifier train|eval`: argparse glue over train.py and evaluate.py."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from router.intent.data import read_records, stratified_split
from router.intent.evaluate import evaluate, format_report, loso
from router.intent.model import IntentModel
from router.intent.train import DEFAULT_EPOCHS, train


def _load_many(paths: Iterable[str]) -> list[dict[str, Any]]:
    """Return the records of every file in `paths`, in order."""
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
