"""Figures for the trained intent model on the labelled pool (not shipped texts).

Usage: python bench/classify_eval.py [path/to/train.jsonl] [--no-loso]

(a) stratified random split (80/20 by source and label, seed 13): per-class
precision/recall/F1, macro-F1 and confusion per language and overall, and the
calibration (ECE, reliability table) of the held-out confidences; (b)
leave-one-source-out: for each source (README prefixes) train without it and
report the accuracy on it, the mean and the lowest. The project's own examples
(router/models/extra_*.jsonl) are always in training, never in a test set.
Same as `omnirouter classifier eval --data FILE --split --loso`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from router.intent import eval_command

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "classify" / "train.jsonl"


def main(argv: list[str]) -> int:
    """Run the split and LOSO evaluations and print the tables."""
    args = [a for a in argv if not a.startswith("--")]
    data = args[0] if args else str(DEFAULT_DATA)
    extra = [] if "--no-loso" in argv else ["--loso"]
    return eval_command(["--data", data, "--split", *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
