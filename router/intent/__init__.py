"""The trained intent model: inquiry / complaint / suggestion for Chinese, English and mixed text.

Pure Python at run time and for training (no numpy, no scikit-learn): a multinomial
logistic regression over hashed sparse features, trained with FTRL-proximal, then
calibrated by temperature scaling.

Why these features. The labelled pool's sources correlate with its labels (each
Chinese class comes from one domain), so a model of words alone learns topic: it
scores ~0.99 on a random split and fails on domains it never saw. The model
therefore sees rule, cue, shape and lexical features, regularised differently
(features.py), and training balances labels and sources (train.py).

One module per job:

- `features`: tokens, style marks and `extract` (the reference feature list);
- `model`: `IntentModel` (weights, `predict` / `predict_hits`, `save` / `load`;
  `load(None)` reads the shipped `router/models/intent.bin`);
- `classifier`: `ModelClassifier`, a drop-in for `router.classify.RuleClassifier`;
- `data`: labelled records, source groups, stratified splits;
- `train`: `train(records, seed=...)`;
- `evaluate`: `evaluate(model, records)`, calibration, leave-one-source-out;
- `cli`: `train_command` / `eval_command` for `omnirouter classifier train|eval`.

The names below are re-exported so callers import them from `router.intent`.
"""

from router.intent.classifier import ModelClassifier
from router.intent.cli import eval_command, train_command
from router.intent.data import (
    EXTRA_DATA_DIR,
    read_records,
    shipped_extra_records,
    source_group,
    stratified_split,
)
from router.intent.evaluate import calibration, evaluate, format_report, loso
from router.intent.features import FeatureList, extract
from router.intent.model import DEFAULT_MODEL_PATH, IntentModel
from router.intent.train import (
    DEFAULT_EPOCHS,
    DEFAULT_REG,
    DEFAULT_RULE_WEIGHT,
    OWN_CAP,
    POOL_CAP,
    fit_temperature,
    sample_weights,
    train,
)

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_MODEL_PATH",
    "DEFAULT_REG",
    "DEFAULT_RULE_WEIGHT",
    "EXTRA_DATA_DIR",
    "OWN_CAP",
    "POOL_CAP",
    "FeatureList",
    "IntentModel",
    "ModelClassifier",
    "calibration",
    "eval_command",
    "evaluate",
    "extract",
    "fit_temperature",
    "format_report",
    "loso",
    "read_records",
    "sample_weights",
    "shipped_extra_records",
    "source_group",
    "stratified_split",
    "train",
    "train_command",
]
