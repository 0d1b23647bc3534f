"""`ModelClassifier`: the trained intent model behind `RuleClassifier`'s interface."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from router.classify import RuleClassifier, detect_language, severity_for
from router.intent.model import IntentModel
from router.model import Classification


class ModelClassifier:
    """`RuleClassifier`'s interface, labelled by the trained model.

    The label, confidence and scores come from the model (which sees the rule
    cues among its features); signals, their spans and the severity come from
    the rules (`severity_for` on the model's label).
    """

    def __init__(
        self,
        model: IntentModel | None = None,
        *,
        amount_threshold: float = 5000.0,
        vip_contacts: frozenset[str] = frozenset(),
        model_path: str | Path | None = None,
    ) -> None:
        self.model = model if model is not None else IntentModel.load(model_path)
        self.rules = RuleClassifier(amount_threshold=amount_threshold, vip_contacts=vip_contacts)
        self.model_version = self.model.version
        # What the rules say with no evidence at all: their prior (see classify).
        self._prior = self.rules.classify("")

    def signals(self, text: str, *, contact: str = "") -> list[Any]:
        """Return the escalation signals in `text` (as RuleClassifier.signals)."""
        return self.rules.signals(text, contact=contact)

    def classify(
        self, text: str, *, subject: str = "", language: str | None = None, contact: str = ""
    ) -> Classification:
        """Return label, scores, severity and signals for a message (spans index `text`)."""
        text = text or ""
        hits, signals = self.rules.analyse(text, subject=subject, contact=contact)
        label, conf, scores, top, known_words = self.model.assess(text, hits, subject=subject)
        if language is None:
            language = detect_language(f"{subject}\n{text}" if subject else text)
        if not hits and not known_words:
            # Nothing in the text the model was trained on (emoji, a language it never
            # saw, noise): its weights for punctuation and "no cue" alone would still
            # name a class, confidently. Say what the rules say on no evidence, their
            # prior, which stays under the usual triage threshold.
            prior = self._prior
            label, conf, scores, top = prior.label, prior.confidence, dict(prior.scores), []
        return Classification(
            label=label,
            confidence=conf,
            scores=scores,
            severity=severity_for(label, signals),
            signals=tuple(signals),
            language=language,
            model_version=self.model_version,
            features=tuple(top),
        )
