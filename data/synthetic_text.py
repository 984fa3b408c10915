"""Text templates of the phantom studies (data/synthetic.py): findings reports and VQA.

    findings_report(sentences) -> "Findings: ..." (one `Lesion.sentence()` per lesion, 0-2)
    QUESTIONS[type] -> 2 phrasings; CHOICES[type] -> 4 closed choices (the answer among them);
    REFERENT[prop] names one of two lesions by position or side; LETTERS labels choices A-D
    pick(rng, options) -> one option, drawn with the study's generator
    corpus_texts(records) -> list[str]   (tokenizer corpus: prompts, targets, choices)
    report_labels(report) -> {"lesion": 0/1, "count": n}, read back from a (generated) report

`corpus_texts` and `report_labels` are re-exported by `medvlm3d.data.synthetic`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from .prompts import format_record

CHOICES = {
    "presence": ("yes", "no", "cannot be determined", "only artifacts"),
    "count": ("0", "1", "2", "3"),
    "kind": ("hyperdense", "hypodense", "isodense", "fat-containing"),
    "size": ("small", "large", "medium", "diffuse"),
    "side": ("left", "right", "midline", "both sides"),
    "position": ("upper", "lower", "middle", "whole length"),
}
QUESTIONS = {
    "presence": ("Is there a focal lesion in this scan?", "Does this scan show any focal lesion?"),
    "count": ("How many focal lesions are there?", "How many lesions does this scan show?"),
    "kind": ("What is the density of {ref}?", "Is {ref} hyperdense or hypodense?"),
    "size": ("What is the size of {ref}?", "Is {ref} small or large?"),
    "side": ("On which side of the patient is {ref}?", "Is {ref} on the left or right side?"),
    "position": ("Is {ref} in the upper or lower part of the scan?", "Where along the body axis is {ref}?"),
}
REFERENT = {"position": "the lesion in the {} part", "side": "the lesion on the {} side"}
COUNT_WORD = {1: "One focal lesion.", 2: "Two focal lesions."}
LETTERS = "ABCD"
ORGANS = "The liver, spleen and kidneys are {}normal. The spine is intact."


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def findings_report(sentences: Sequence[str]) -> str:
    """The report of a study with one sentence per lesion (none: a normal study)."""
    if not sentences:
        return "Findings: No focal lesion. " + ORGANS.format("")
    parts = [COUNT_WORD[len(sentences)], *sentences]
    return "Findings: " + " ".join(parts) + " " + ORGANS.format("otherwise ")


def corpus_texts(records: Sequence[dict[str, Any]]) -> list[str]:
    """Texts for tokenizer training: each record's prompt and target as the model sees them
    (closed VQA with its "Choices: A. ..." list), the raw answers and every choice string."""
    texts: list[str] = []
    for rec in records:
        question, target = format_record(rec)
        texts += [question, target, str(rec["answer"])] + [str(c) for c in rec.get("choices") or []]
    return texts


_LESION_RE = re.compile(r"\b(small|large) (hyperdense|hypodense) lesion in the (upper|lower) (left|right)")


def report_labels(report: str) -> dict[str, int]:
    """Lesion presence and count read from a (generated) report in this module's template."""
    n = len(_LESION_RE.findall(report))
    negative = "no focal lesion" in report.lower()
    return {"lesion": int(n > 0 or (not negative and "lesion" in report.lower())), "count": n}
