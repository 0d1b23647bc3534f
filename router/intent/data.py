"""Labelled records for training and evaluation: reading, source groups, splits."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.classify import detect_language
from router.model import LABELS

# The project's own labelled examples (package data beside the shipped model).
EXTRA_DATA_DIR = Path(__file__).resolve().parent.parent / "models"

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
