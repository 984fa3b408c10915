"""Phantom CT studies whose ground truth is known: the embedded default's data.

    make_study(seed, shape=(32, 64, 64)) -> PhantomStudy
        .hu          int16 numpy [D, H, W] (z, y, x) in Hounsfield units
        .lesions     list[Lesion] (0-2): kind, size, side, position, slice_range
        .report      templated findings text;  .vqa_items(...) -> closed + open VQA dicts
        .to_nifti()  nibabel image of the [X, Y, Z] array with an RAS+ affine;  .save(path)
    make_dataset(out_dir, n, seed=0, shape=...) -> Path of out_dir/manifest.jsonl
        (volumes/<id>.nii.gz + one record per report / VQA item, written by `write_manifest`)
    corpus_texts(records) -> list[str]   (tokenizer corpus: prompts, targets, choices)
    report_labels(report) -> {"lesion": 0/1, "count": n}
    study_seed(seed, i), split_seeds(seed, n), check_disjoint_seeds(*(seed, n))
    `medvlm3d synth --out DIR [--n 50] [--seed 0] [--shape D H W]` (CLI verb)

Axes. `hu[z, y, x]` is the volume the loader returns, `[1, D, H, W]` after RAS orientation:
D = z, index 0 the most inferior slice; H = y, index 0 the most posterior row; W = x, index 0
the patient's LEFT-most column. The NIfTI holds `hu.transpose(2, 1, 0)` ([X, Y, Z]) with a
diagonal positive affine, so `nibabel.aff2axcodes(affine) == ("R", "A", "S")`: in nibabel's
RAS+ world +x points to the patient's Right, +y Anterior, +z Superior. Hence patient left =
low x = W indices below the midline (x < W/2), and the liver sits on the right (high W).
"upper" = superior = z >= D/2 (high D indices); "lower" = z < D/2.

Anatomy (HU, each jittered per study): air -1000; a body ellipse over all slices (fat rim
-100, soft tissue 40); liver 60 (right, upper), spleen 50 (left, upper), kidneys 30 (both
sides, posterior, lower-middle); a vertebral column 700 (posterior midline); Gaussian noise
sd 10 HU. Lesions are spheroids added to whatever tissue they sit in: hyperdense +130..+170,
hypodense -80..-100. In-plane radius (fraction of min(H, W)): small 0.045-0.06, large
0.09-0.12; craniocaudal radius (fraction of D): small 0.06-0.08, large 0.12-0.16. Each lesion
lies wholly on one side of the midline, in one craniocaudal half, clear of the spine.
Default spacing: (160/D, 384/H, 384/W) mm for (z, y, x).

Balance. Lesion counts 0/1/2 are equally likely; kind, size, side and position are 50/50.
Two lesions always differ in position or in side (the "referent"), and questions about one of
them name it by that property ("the lesion in the upper part") and never ask it. Every study
has one count question; normal studies always have a presence question, lesion studies with
probability p0 / (1 - p0), so presence answers are 50/50. Closed choices (4) are shuffled.

Seeds. Study i of a dataset made with seed s uses study seed s * 1_000_003 + i (`study_seed`),
so datasets with different seeds and n <= 1_000_003 never share a study. The demo uses seed 0
for training and seed 1 for testing. The same seed gives byte-identical volumes and manifest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from .errors import ConfigError
from .readers import REPORT_QUESTION, validate_record, write_manifest
from .synthetic_text import (  # noqa: F401  (corpus_texts, report_labels: re-exported)
    CHOICES,
    LETTERS,
    QUESTIONS,
    REFERENT,
    corpus_texts,
    findings_report,
    pick,
    report_labels,
)

logger = logging.getLogger(__name__)

SEED_STRIDE = 1_000_003
DEFAULT_SHAPE = (32, 64, 64)
MIN_SHAPE = (8, 24, 24)
FOV_MM = (160.0, 384.0, 384.0)
LESION_COUNT_PROBS = (1 / 3, 1 / 3, 1 / 3)
NOISE_SD = 10.0
HU = {"air": -1000.0, "fat": -100.0, "tissue": 40.0, "liver": 60.0, "spleen": 50.0, "kidney": 30.0, "bone": 700.0}
LESION_DELTA = {"hyperdense": (130.0, 170.0), "hypodense": (-100.0, -80.0)}
# size -> ((in-plane radius range, fraction of min(H, W)), (z radius range, fraction of D))
LESION_RADIUS = {"small": ((0.045, 0.06), (0.06, 0.08)), "large": ((0.09, 0.12), (0.12, 0.16))}
PROPERTIES = {"kind": ("hyperdense", "hypodense"), "size": ("small", "large"),
              "side": ("left", "right"), "position": ("upper", "lower")}
_OPPOSITE = {v: vals[1 - i] for vals in PROPERTIES.values() for i, v in enumerate(vals)}


@dataclass(frozen=True)
class Lesion:
    """One spheroid lesion; `center`/`radii` are (z, y, x) voxels, `slice_range` inclusive z."""

    kind: str
    size: str
    side: str
    position: str
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    delta_hu: float
    slice_range: tuple[int, int]

    @property
    def slice_labels(self) -> list[int]:
        return list(range(self.slice_range[0], self.slice_range[1] + 1))

    def sentence(self) -> str:
        lo, hi = self.slice_range
        return f"A {self.size} {self.kind} lesion in the {self.position} {self.side} (slices {lo}-{hi})."

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["center"] = [round(float(c), 3) for c in self.center]
        d["radii"] = [round(float(r), 3) for r in self.radii]
        d["delta_hu"] = round(float(self.delta_hu), 1)
        d["slice_range"] = list(self.slice_range)
        return d


@dataclass
class PhantomStudy:
    """A phantom CT: `hu` int16 [D, H, W] (z, y, x), see the module docstring for axes."""

    seed: int
    hu: np.ndarray
    spacing: tuple[float, float, float]  # (z, y, x) mm
    lesions: list[Lesion]
    referent: str = ""  # "" | "position" | "side": the property naming each of two lesions
    lesion_probs: tuple[float, float, float] = LESION_COUNT_PROBS
    report: str = field(init=False)

    def __post_init__(self) -> None:
        self.lesions = sorted(self.lesions, key=lambda l: (l.position != "upper", l.side != "left"))
        self.report = findings_report([l.sentence() for l in self.lesions])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.hu.shape)  # type: ignore[return-value]

    @property
    def affine(self) -> np.ndarray:
        """RAS+ affine of the [X, Y, Z] array: voxel (i, j, k) -> mm, volume centred on 0."""
        sz, sy, sx = self.spacing
        d, h, w = self.shape
        aff = np.diag([sx, sy, sz, 1.0])
        aff[:3, 3] = [-(w - 1) / 2 * sx, -(h - 1) / 2 * sy, -(d - 1) / 2 * sz]
        return aff

    @property
    def slice_labels(self) -> list[int]:
        return sorted({z for l in self.lesions for z in l.slice_labels})

    def to_nifti(self) -> nib.Nifti1Image:
        img = nib.Nifti1Image(np.ascontiguousarray(self.hu.transpose(2, 1, 0)), self.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        return img

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write `.nii.gz` atomically (deterministic gzip: nibabel writes mtime 0, no name)."""
        from medvlm3d.io import atomic_file

        with atomic_file(path) as tmp:
            self.to_nifti().to_filename(str(tmp))
        return Path(path)

    def meta(self) -> dict[str, Any]:
        return {"seed": self.seed, "shape": list(self.shape), "spacing": list(self.spacing),
                "n_lesions": len(self.lesions), "referent": self.referent,
                "lesions": [l.to_dict() for l in self.lesions]}

    def vqa_items(self, max_items: int = 6, forms: Sequence[str] = ("closed", "open")) -> list[dict[str, Any]]:
        """VQA dicts (question, answer, question_type, [choices, answer_choice], [slice_labels],
        meta {"form", "lesion"}) for up to `max_items` questions, each in every form of `forms`."""
        if max_items < 2:
            raise ConfigError(f"max_items must be >= 2 (a count and a presence question), got {max_items}")
        if not forms or any(f not in ("closed", "open") for f in forms):
            raise ConfigError(f"forms must be a non-empty subset of ('closed', 'open'), got {forms!r}")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 1]))
        p0 = self.lesion_probs[0]
        ask_presence = not self.lesions or rng.random() < min(1.0, p0 / max(1e-9, 1.0 - p0))
        questions: list[tuple[str, str, str, int | None]] = []  # (type, text, answer, lesion index)
        if ask_presence:
            questions.append(("presence", pick(rng, QUESTIONS["presence"]), "yes" if self.lesions else "no", None))
        questions.append(("count", pick(rng, QUESTIONS["count"]), str(len(self.lesions)), None))
        pairs = [(i, p) for i in range(len(self.lesions)) for p in PROPERTIES if p != self.referent]
        for j in rng.permutation(len(pairs))[: max(0, max_items - len(questions))]:
            i, prop = pairs[int(j)]
            les = self.lesions[i]
            ref = REFERENT[self.referent].format(getattr(les, self.referent)) if self.referent else "the lesion"
            text = pick(rng, QUESTIONS[prop]).format(ref=ref)
            questions.append((prop, text, getattr(les, prop), i))
        items = []
        for qtype, text, answer, idx in questions:
            slices = self.lesions[idx].slice_labels if idx is not None else self.slice_labels
            for form in forms:
                item: dict[str, Any] = {"task": "vqa", "question": text, "answer": answer, "question_type": qtype}
                if form == "closed":
                    choices = [CHOICES[qtype][int(k)] for k in rng.permutation(4)]
                    item["choices"] = choices
                    item["answer_choice"] = LETTERS[choices.index(answer)]
                if slices:
                    item["slice_labels"] = list(slices)
                item["meta"] = {"form": form, "lesion": idx}
                items.append(item)
        return items


# --------------------------------------------------------------------------------------------
# volume synthesis


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) < m for s, m in zip(shape, MIN_SHAPE)):
        raise ConfigError(f"shape must be (D, H, W) with D >= {MIN_SHAPE[0]}, H, W >= {MIN_SHAPE[1]}; got {shape!r}")
    return int(shape[0]), int(shape[1]), int(shape[2])


def _ellipsoid(grid: tuple[np.ndarray, ...], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def _place_lesion(rng: np.random.Generator, props: dict[str, str], shape: tuple[int, int, int],
                  body: dict[str, float]) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Centre and radii (z, y, x) of a lesion wholly inside its side, half, the body, off the spine."""
    d, h, w = shape
    (r_lo, r_hi), (z_lo, z_hi) = LESION_RADIUS[props["size"]]
    r = float(rng.uniform(r_lo, r_hi)) * min(h, w)
    rz = float(rng.uniform(z_lo, z_hi)) * d
    half = d / 2.0
    zc = rng.uniform(half + rz, d - 1 - rz) if props["position"] == "upper" else rng.uniform(rz, half - rz - 1e-3)
    cx, cy, ax, ay = body["cx"], body["cy"], body["ax"] * 0.9, body["ay"] * 0.9
    midline = min(cx, (w - 1) / 2) if props["side"] == "left" else max(cx, (w - 1) / 2)
    for _ in range(500):
        y = rng.uniform(cy - ay + r, cy + ay - r)
        x = rng.uniform(midline - ax, midline - r - 1.5) if props["side"] == "left" else rng.uniform(
            midline + r + 1.5, midline + ax)
        inside = ((x - cx) / (ax - r - 1)) ** 2 + ((y - cy) / (ay - r - 1)) ** 2 <= 1.0
        off_spine = np.hypot(x - cx, y - body["spine_y"]) >= r + body["spine_r"] + 1.5
        if inside and off_spine:
            return (float(zc), float(y), float(x)), (rz, r, r)
    raise ConfigError(f"shape {shape} is too small to place a {props['size']} lesion; use a larger shape")


def make_study(
    seed: int,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] | None = None,
    lesion_probs: Sequence[float] = LESION_COUNT_PROBS,
    n_lesions: int | None = None,
    paint_lesions: bool = True,
) -> PhantomStudy:
    """One phantom study, fully determined by `seed` (and the other arguments).

    `n_lesions` forces the count (else drawn with `lesion_probs` for 0/1/2). `paint_lesions=False`
    gives the healthy twin: the same study (anatomy, noise, recorded lesions) without lesions
    painted, for counterfactual checks.
    """
    d, h, w = shape = _check_shape(shape)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    probs = np.asarray(lesion_probs, dtype=float)
    if probs.shape != (3,) or (probs < 0).any() or not np.isclose(probs.sum(), 1.0):
        raise ConfigError(f"lesion_probs must be 3 non-negative numbers summing to 1 (P of 0/1/2), got {lesion_probs!r}")
    if n_lesions is not None and n_lesions not in (0, 1, 2):
        raise ConfigError(f"n_lesions must be 0, 1, 2 or None, got {n_lesions!r}")
    sp = tuple(float(s) for s in (spacing if spacing is not None else np.divide(FOV_MM, shape)))
    if len(sp) != 3 or min(sp) <= 0:
        raise ConfigError(f"spacing must be 3 positive mm values (z, y, x), got {spacing!r}")
    anat, les_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(3))

    def jit(lo: float = 0.9, hi: float = 1.1) -> float:
        return float(anat.uniform(lo, hi))

    zz, yy, xx = np.ogrid[0:d, 0:h, 0:w]
    zz, yy, xx = (a.astype(np.float32) for a in (zz, yy, xx))
    cx, cy = (w - 1) / 2 + anat.uniform(-0.02, 0.02) * w, (h - 1) / 2 + anat.uniform(-0.02, 0.02) * h
    ax, ay = anat.uniform(0.40, 0.45) * w, anat.uniform(0.30, 0.35) * h
    body = {"cx": cx, "cy": cy, "ax": ax, "ay": ay, "spine_y": cy - 0.70 * ay, "spine_r": 0.20 * ay * jit()}
    rho = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2  # [1, H, W]
    vol = np.full(shape, HU["air"], dtype=np.float32)
    vol[:, (rho <= 1.0)[0]] = HU["fat"]
    inner = rho <= 0.81  # 0.9 ** 2
    vol[:, inner[0]] = HU["tissue"]
    organs = [  # (name, (z, y, x) centre, (z, y, x) radii)
        ("liver", (0.72 * d, cy + 0.05 * ay, cx + 0.45 * ax), (0.25 * d, 0.45 * ay, 0.40 * ax)),
        ("spleen", (0.72 * d, cy - 0.15 * ay, cx - 0.55 * ax), (0.15 * d, 0.25 * ay, 0.20 * ax)),
        ("kidney", (0.40 * d, cy - 0.45 * ay, cx - 0.42 * ax), (0.15 * d, 0.22 * ay, 0.16 * ax)),
        ("kidney", (0.40 * d, cy - 0.45 * ay, cx + 0.42 * ax), (0.15 * d, 0.22 * ay, 0.16 * ax)),
    ]
    for name, c, r in organs:
        c = (c[0] + anat.uniform(-0.05, 0.05) * d, c[1] + anat.uniform(-0.05, 0.05) * ay, c[2])
        vol[_ellipsoid((zz, yy, xx), c, [x * jit() for x in r]) & inner] = HU[name] + anat.uniform(-5, 5)
    spine = ((xx - cx) ** 2 + (yy - body["spine_y"]) ** 2 <= body["spine_r"] ** 2)[0]
    vol[:, spine] = HU["bone"] + anat.uniform(-50, 50)

    count = int(les_rng.choice(3, p=probs)) if n_lesions is None else int(n_lesions)
    props = [{k: str(les_rng.choice(v)) for k, v in PROPERTIES.items()} for _ in range(count)]
    referent = ""
    if count == 2:
        referent = str(les_rng.choice(("position", "side")))
        props[1][referent] = _OPPOSITE[props[0][referent]]
    lesions = []
    for p in props:
        center, radii = _place_lesion(les_rng, p, shape, body)
        delta = float(les_rng.uniform(*LESION_DELTA[p["kind"]]))
        mask = _ellipsoid((zz, yy, xx), center, radii)
        zs = np.flatnonzero(mask.any(axis=(1, 2)))
        if paint_lesions:
            vol[mask] += delta
        lesions.append(Lesion(p["kind"], p["size"], p["side"], p["position"], center, radii, delta,
                              (int(zs[0]), int(zs[-1]))))
    vol += noise_rng.standard_normal(shape, dtype=np.float32) * np.float32(NOISE_SD)
    hu = np.clip(np.rint(vol), -1024, 3071).astype(np.int16)
    return PhantomStudy(int(seed), hu, sp, lesions, referent, tuple(float(p) for p in probs))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# datasets


def study_seed(seed: int, index: int) -> int:
    """The seed of study `index` in a dataset made with `seed` (see the module docstring)."""
    if not 0 <= index < SEED_STRIDE:
        raise ConfigError(f"study index must be in [0, {SEED_STRIDE}), got {index}")
    return int(seed) * SEED_STRIDE + int(index)


def split_seeds(seed: int, n: int) -> list[int]:
    """Study seeds of a dataset of `n` studies made with `seed`."""
    return [study_seed(seed, i) for i in range(n)]


def check_disjoint_seeds(*splits: tuple[int, int]) -> None:
    """ValueError if datasets given as (seed, n) pairs share any study seed."""
    seen: dict[int, int] = {}
    for k, (seed, n) in enumerate(splits):
        for s in split_seeds(seed, n):
            if s in seen:
                raise ConfigError(f"datasets {splits[seen[s]]} and {splits[k]} (seed, n) share study seed {s}")
            seen[s] = k


def study_records(study: PhantomStudy, study_id: str, image: str, questions_per_study: int = 6,
                  forms: Sequence[str] = ("closed", "open")) -> list[dict[str, Any]]:
    """The manifest records of one study: a report record, then its VQA records."""
    report: dict[str, Any] = {"id": f"{study_id}_report", "image": image, "task": "report",
                              "question": REPORT_QUESTION, "answer": study.report,
                              "label": "abnormal" if study.lesions else "normal",
                              "labels": {"lesion": int(bool(study.lesions))}}
    if study.lesions:
        report["slice_labels"] = study.slice_labels
    report["meta"] = {"study": study_id, **study.meta()}
    records = [report]
    for k, item in enumerate(study.vqa_items(questions_per_study, forms)):
        item["meta"] = {"study": study_id, **item["meta"]}
        records.append({"id": f"{study_id}_q{k}", "image": image, **item})
    return [validate_record(r, f"phantom study {study_id}") for r in records]


def make_dataset(
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    shape: Sequence[int] = DEFAULT_SHAPE,
    questions_per_study: int = 6,
    forms: Sequence[str] = ("closed", "open"),
    lesion_probs: Sequence[float] = LESION_COUNT_PROBS,
) -> Path:
    """Write `n` studies to out_dir/volumes/phantom_XXXXX.nii.gz and out_dir/manifest.jsonl."""
    if not 1 <= int(n) <= SEED_STRIDE:
        raise ConfigError(f"n must be between 1 and {SEED_STRIDE}, got {n}")
    make_study(0, MIN_SHAPE).vqa_items(questions_per_study, forms)  # checks both arguments early
    out = Path(out_dir)
    records: list[dict[str, Any]] = []
    for i, s in enumerate(split_seeds(seed, int(n))):
        sid = f"phantom_{i:05d}"
        study = make_study(s, shape, lesion_probs=lesion_probs)
        study.save(out / "volumes" / f"{sid}.nii.gz")
        records.extend(study_records(study, sid, f"volumes/{sid}.nii.gz", questions_per_study, forms))
    path = write_manifest(records, out / "manifest.jsonl")
    logger.info("wrote %d studies, %d records to %s", n, len(records), path)
    return path
