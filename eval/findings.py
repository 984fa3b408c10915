"""Rule-based finding extractors for clinical-efficacy scoring of generated reports.

    phantom_findings(report) -> {"lesion", "hyperdense", "hypodense", "left", "right": 0/1}
    ct_rate_findings(report) -> {<18 CT-RATE labels, in CT_RATE_LABELS order>: 0/1}
    FINDING_EXTRACTORS = {"phantom": phantom_findings, "ct_rate": ct_rate_findings}

Both map one report (str) to a binary label dict; `medvlm3d.eval.metrics.findings_prf` then scores
the labels of generated reports against those of the references (or against dataset labels).

Phantoms. Presence comes from `medvlm3d.data.synthetic.report_labels` (the template's own
reader). Kind and side are read from the sentences that mention a lesion and carry no "no"
("A small hyperdense lesion in the upper left (slices 3-9)."), so a report with a hyperdense lesion
on the left and a hypodense one on the right sets all four. They are read only when a lesion is
present.

CT-RATE. An APPROXIMATION in the spirit of the CheXpert labeler, not the classifier that produced
CT-RATE's `*_predicted_labels.csv`:
  1. the lower-cased report is split into clauses: at sentence ends (. ! ? followed by space),
     new lines, ";" and ":", before contrast words (but, however, whereas, although, though,
     while, except) and before a new negated phrase (", no ..." / "and no ...");
  2. a label is positive when one of its keyword rules matches a clause that is not negated;
  3. a clause is negated when it holds a negation cue: no, not, n't, without, absence of,
     absent, negative for, free of, none, nor, ruled out, rule out, resolved, unremarkable.
     Uncertainty ("cannot be excluded", "could not be ruled out", "not excluded") counts as
     positive (CheXpert's U-ones policy): those phrases are removed before the negation test.
Known limits: negation scope is the whole clause ("no effusion, atelectasis at the bases" negates
both, as no comma split is made; "atelectasis, not present before, is seen" reads as negated);
keywords are English and follow CT-RATE's wording ("pleural effusion-thickening was not
detected", "heart size increased", "calcific atheroma plaques in the aorta and coronary arteries").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from medvlm3d.data.formats.ct_rate import CT_RATE_LABELS
from medvlm3d.data.errors import DataError
from medvlm3d.data.synthetic import report_labels

__all__ = ["CT_RATE_LABELS", "FINDING_EXTRACTORS", "PHANTOM_FINDINGS", "ct_rate_findings", "phantom_findings",
           "split_clauses", "is_negated"]

PHANTOM_FINDINGS = ("lesion", "hyperdense", "hypodense", "left", "right")
_W = r"\W+(?:\w+\W+)"  # a gap of whole words: _W + "{0,3}" = up to 3 words in between


def _check_report(report: object) -> str:
    if not isinstance(report, str):
        raise DataError(f"report: expected a str, got {type(report).__name__}")
    return report


# --------------------------------------------------------------------------------------------
# phantoms


def phantom_findings(report: str) -> dict[str, int]:
    """Lesion presence, kind (hyperdense/hypodense) and side (left/right) of a phantom report."""
    text = _check_report(report).lower()
    out = dict.fromkeys(PHANTOM_FINDINGS, 0)
    out["lesion"] = int(report_labels(text)["lesion"])
    if out["lesion"]:
        for clause in re.split(r"(?<=[.!?])\s+|\n", text):
            if "lesion" in clause and not re.search(r"\bno\b", clause):
                for key in PHANTOM_FINDINGS[1:]:
                    if re.search(rf"\b{key}\b", clause):
                        out[key] = 1
    return out


# --------------------------------------------------------------------------------------------
# CT-RATE


@dataclass(frozen=True)
class _Rule:
    """A clause matches when, after removing `strip`, every `all_of` regex matches and `none_of` does not."""

    all_of: tuple[str, ...]
    none_of: str | None = None
    strip: str | None = None

    def matches(self, clause: str) -> bool:
        if self.strip:
            clause = re.sub(self.strip, " ", clause)
        if self.none_of and re.search(self.none_of, clause):
            return False
        return all(re.search(p, clause) for p in self.all_of)


_CALC = r"calcif|atheroscl|atherom|\bplaque"
_VESSEL = r"aort|arter|vascular|\bvessel|carotid|brachiocephalic|subclavian|iliac"
_EFFUSION = r"(?:effusion|fluid)"

_CT_RATE_RULES: dict[str, tuple[_Rule, ...]] = {
    "Medical material": (
        _Rule((r"catheter|pacemaker|\bstents?\b|prosthe(?:sis|tic)|sternotomy|cerclage|\bclips?\b|"
               r"(?:endotracheal|tracheostomy|chest|thoracostomy|nasogastric|drainage) tube|\bdrains?\b|"
               r"\bport\b|medical (?:device|material)|\bimplant|\belectrodes?\b|annuloplasty|"
               r"(?:metallic|metal) (?:wire|material|implant|object|densit)|(?:sternal|surgical) (?:wire|suture)",),),
    ),
    "Arterial wall calcification": (
        _Rule((_CALC, _VESSEL), strip=r"coronary arter\w*|coronar\w*"),
        _Rule((r"atheroscleros|atherom",), none_of=r"coronar"),
    ),
    "Cardiomegaly": (
        _Rule((r"cardiomegal|cardiac enlargement|enlarged heart|heart (?:is )?enlarged|increased cardiothoracic",),),
        _Rule((rf"(?:heart|cardiac){_W}{{0,3}}(?:size|dimension|silhouette|contour|shadow)s?{_W}{{0,3}}"
               r"(?:increas|enlarg|larg)",),),
    ),
    "Pericardial effusion": (
        _Rule((rf"pericard\w*{_W}{{0,2}}{_EFFUSION}|{_EFFUSION}\W+(?:in|of|within)\W+(?:the\W+)?pericard",),),
    ),
    "Coronary artery wall calcification": (
        _Rule((r"coronar|\b(?:lad|lcx|rca)\b|left anterior descending|circumflex", _CALC),),
    ),
    "Hiatal hernia": (_Rule((rf"hiat\w*\W+hernia|hernia\w*{_W}{{0,3}}hiat|paraesophageal hernia",),),),
    "Lymphadenopathy": (
        _Rule((r"lymphadenopath|adenopath",),),
        _Rule((rf"(?:enlarg\w*|patholog\w*|prominent|increased|bulky|large|conglomerat\w*|necrotic){_W}{{0,4}}"
               r"lymph\W*nodes?",),),
        _Rule((rf"lymph\W*nodes?{_W}{{0,6}}(?:enlarg\w*|patholog\w*|increased in (?:size|number)|bulky|conglomerat)",),),
    ),
    "Emphysema": (_Rule((r"emphysem|\bbulla|bullous",),),),
    "Atelectasis": (_Rule((r"atelecta",),),),
    "Lung nodule": (_Rule((r"nodul",), none_of=r"thyroid|adrenal|hepat|liver|renal|kidney|breast|splen|pancrea"),),
    "Lung opacity": (
        _Rule((r"opacit|ground\W?glass|infiltrat",),),
        _Rule((r"(?:increased|increase in)\W+(?:\w+\W+){0,2}densit|densit\w* increas",),
              none_of=r"bone|vertebr|osteo|scleros|sclerot"),
    ),
    "Pulmonary fibrotic sequela": (_Rule((r"fibro(?:sis|tic|atelecta|us)|sequela|\bscar|parenchymal bands?",),),),
    "Pleural effusion": (
        _Rule((rf"pleural{_W}{{0,2}}{_EFFUSION}|{_EFFUSION}\W+(?:in|of|within)\W+(?:the\W+)?(?:\w+\W+){{0,2}}pleura|"
               r"hydrothorax",),),
    ),
    "Mosaic attenuation pattern": (_Rule((r"mosaic",),),),
    "Peribronchial thickening": (
        _Rule((rf"peribronch\w*{_W}{{0,3}}thicken|bronch\w* wall{_W}{{0,2}}thicken|"
               rf"thicken\w*{_W}{{0,3}}(?:peribronch|bronchial wall)",),),
    ),
    "Consolidation": (_Rule((r"consolidat",),),),
    "Bronchiectasis": (_Rule((r"bronchiecta",),),),
    "Interlobular septal thickening": (
        _Rule((rf"sept\w*{_W}{{0,2}}thicken|thicken\w*{_W}{{0,4}}sept",), none_of=r"ventric|atri|cardiac|nasal"),
    ),
}
assert tuple(_CT_RATE_RULES) == CT_RATE_LABELS, "a CT-RATE label has no rule"

_CLAUSE_SPLIT = re.compile(
    r"(?<=[.!?])\s+|\n+|[;:]"
    r"|\b(?=(?:but|however|whereas|although|though|while|except)\b)"
    r"|,\s*(?=no\b)|\s+and\s+(?=(?:there\s+(?:is|are|was|were)\s+)?no\b)"
)
_UNCERTAIN = re.compile(r"(?:cannot|can ?not|could ?not|could ?n't|can't|not)\s+(?:be\s+)?(?:entirely\s+)?"
                        r"(?:excluded|ruled out)")
_NEGATION = re.compile(r"\bno\b|\bnot\b|n't\b|\bwithout\b|\babsen(?:ce|t)\b|negative for|free of|\bnone\b|\bnor\b|"
                       r"ruled out|rule out|\bresolved\b|\bunremarkable\b")


def split_clauses(text: str) -> list[str]:
    """Lower-cased clauses of a report, split as described in the module docstring."""
    return [c.strip() for c in _CLAUSE_SPLIT.split(_check_report(text).lower()) if c and c.strip()]


def is_negated(clause: str) -> bool:
    """True when the clause holds a negation cue (uncertainty phrases do not count)."""
    return bool(_NEGATION.search(_UNCERTAIN.sub(" ", clause.lower())))


def ct_rate_findings(report: str) -> dict[str, int]:
    """The 18 CT-RATE labels (0/1, in CT_RATE_LABELS order) read from a report by keyword rules."""
    out = dict.fromkeys(CT_RATE_LABELS, 0)
    for clause in split_clauses(report):
        if is_negated(clause):
            continue
        for label, rules in _CT_RATE_RULES.items():
            if not out[label] and any(rule.matches(clause) for rule in rules):
                out[label] = 1
    return out


FINDING_EXTRACTORS: dict[str, Callable[[str], dict[str, int]]] = {
    "phantom": phantom_findings,
    "ct_rate": ct_rate_findings,
}
