"""The CT-RATE format: a CT-RATE root -> report record candidates (chest CT, NIfTI volumes).

Layout (shared/FORMATS.md), under `dataset/` (the root may be `dataset/` or its parent):
    {train,valid}/<patient>/<study>/<VolumeName>   e.g. valid/valid_1/valid_1_a/valid_1_a_1.nii.gz
    radiology_text_reports/{train_reports.csv, validation_reports.csv}
        VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
        ("Not given." or an empty cell = missing)
    metadata/{train_metadata.csv, validation_metadata.csv}              (optional)
        VolumeName, RescaleSlope, RescaleIntercept, XYSpacing ("[0.7, 0.7]"), ZSpacing
    multi_abnormality_labels/{train_predicted_labels.csv, valid_predicted_labels.csv} (optional)
        VolumeName + the 18 binary columns of CT_RATE_LABELS

One record per reports row, in file order:
    {id: VolumeName without .nii.gz, image: absolute .nii.gz path, task: "report",
     question: REPORT_QUESTION, answer: Findings (target "findings") or Findings + "\\n" +
     Impressions ("findings_impressions"; either alone when the other is missing),
     labels: {18 names: 0/1} (when the labels CSV exists),
     meta: {split, rescale_slope, rescale_intercept, xy_spacing: [x, y], z_spacing} (spacing
     and rescale when the metadata CSV exists)}
When a metadata / labels CSV exists, a volume missing from it is a bad record. Whether a volume
already holds HU (the "known trap") is decided when loading it (data/volume.py), not here.
Detected from layout: a folder holding `radiology_text_reports/` (itself, or through `dataset/`);
a reports CSV passed on its own is refused with a message naming the root to pass instead.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import DataError
from ..readers import REPORT_QUESTION
from .base import DATASETS, Candidate, DatasetFormat, Record, csv_header, csv_rows

logger = logging.getLogger(__name__)

CT_RATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
)  # fmt: skip
CT_RATE_SPLITS = ("train", "valid")
REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
METADATA_COLUMNS = ("VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing")
# split -> (reports csv, metadata csv, labels csv)
_FILES = {
    "train": ("train_reports.csv", "train_metadata.csv", "train_predicted_labels.csv"),
    "valid": ("validation_reports.csv", "validation_metadata.csv", "valid_predicted_labels.csv"),
}
_MISSING = {"", "not given.", "not given"}
_VOLUME = re.compile(r"^(?P<split>[A-Za-z]+)_(?P<patient>[^_]+)_(?P<study>[^_]+)_(?P<recon>[^_]+)\.nii(\.gz)?$")
_Index = dict[str, tuple[int, dict[str, str]]]  # VolumeName -> (line, row)
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def find_ct_rate_dataset(root: Path) -> Path | None:
    """The `dataset/` folder of a CT-RATE root (the folder itself or its `dataset/`), or None."""
    for cand in (root, root / "dataset"):
        if (cand / "radiology_text_reports").is_dir():
            return cand
    return None


def volume_path(dataset: Path, volume_name: str) -> Path:
    """"valid_1_a_1.nii.gz" -> <dataset>/valid/valid_1/valid_1_a/valid_1_a_1.nii.gz."""
    m = _VOLUME.match(volume_name)
    if m is None:
        raise ValueError(f"VolumeName {volume_name!r} is not like 'train_12_a_1.nii.gz'")
    patient = f"{m['split']}_{m['patient']}"
    return dataset / m["split"] / patient / f"{patient}_{m['study']}" / volume_name


def _field(value: str) -> str:
    value = value.strip()
    return "" if value.lower() in _MISSING else value


def _float(value: str, what: str, where: str) -> float:
    try:
        out = float(value)
    except ValueError:
        out = math.nan
    if not math.isfinite(out):
        raise DataError(f"{where}: {what} must be a finite number, got {value!r}")
    return out


def _index(path: Path, required: tuple[str, ...], split: str) -> _Index | None:
    """VolumeName -> (line, row) of an optional per-volume CSV (None when the file is absent)."""
    if not path.is_file():
        logger.info("CT-RATE %s: no %s; records go without it", split, path)
        return None
    out: _Index = {}
    for line, row in csv_rows(path, required):
        if isinstance(row, str):  # a malformed row: its volume then has no row here
            logger.warning("%s line %d: %s", path, line, row)
        else:
            out.setdefault(row["VolumeName"].strip(), (line, row))
    return out


def _lookup(index: _Index, csv: Path, name: str, where: str) -> tuple[dict[str, str], str]:
    """(row, where-of-that-row) for volume `name`; DataError when `csv` has no row for it."""
    if name not in index:
        raise DataError(f"{where}: volume {name!r} has no (well-formed) row in {csv}")
    line, row = index[name]
    return row, f"{csv} line {line} ({name})"


def _meta(row: dict[str, str], where: str) -> dict[str, object]:
    xy = [float(x) for x in _NUMBER.findall(row["XYSpacing"])]
    if len(xy) != 2 or not all(math.isfinite(v) and v > 0 for v in xy):
        raise DataError(f"{where}: XYSpacing must be two positive numbers like '[0.7, 0.7]', got {row['XYSpacing']!r}")
    z = _float(row["ZSpacing"], "ZSpacing", where)
    if z <= 0:
        raise DataError(f"{where}: ZSpacing must be > 0, got {row['ZSpacing']!r}")
    return {
        "rescale_slope": _float(row["RescaleSlope"], "RescaleSlope", where),
        "rescale_intercept": _float(row["RescaleIntercept"], "RescaleIntercept", where),
        "xy_spacing": xy,
        "z_spacing": z,
    }


def _labels(row: dict[str, str], where: str) -> dict[str, int]:
    out = {}
    for name in CT_RATE_LABELS:
        value = _float(row[name], f"label {name!r}", where)
        if value not in (0.0, 1.0):
            raise DataError(f"{where}: label {name!r} must be 0 or 1, got {row[name]!r}")
        out[name] = int(value)
    return out


def ct_rate_candidates(root: Path, split: str | None, target: str) -> Iterator[Candidate]:
    """Candidates of a CT-RATE root for `split` ("train" | "valid" | None = both present)."""
    if split is not None and split not in CT_RATE_SPLITS:
        raise ValueError(f"CT-RATE split must be one of {list(CT_RATE_SPLITS)} or None, got {split!r}")
    dataset = find_ct_rate_dataset(root)
    if dataset is None:
        raise DataError(f"{root}: not a CT-RATE root; expected radiology_text_reports/ in it or in {root / 'dataset'}")
    reports_dir = dataset / "radiology_text_reports"
    splits = [split] if split is not None else [s for s in CT_RATE_SPLITS if (reports_dir / _FILES[s][0]).is_file()]
    if not splits:
        expected = [str(reports_dir / _FILES[s][0]) for s in CT_RATE_SPLITS]
        raise DataError(f"{root}: no CT-RATE reports found; expected one of {expected}")
    for name in splits:
        reports_csv, meta_csv, labels_csv = _FILES[name]
        meta_path = dataset / "metadata" / meta_csv
        labels_path = dataset / "multi_abnormality_labels" / labels_csv
        meta_index = _index(meta_path, METADATA_COLUMNS, name)
        label_index = _index(labels_path, ("VolumeName",) + CT_RATE_LABELS, name)
        reports_path = reports_dir / reports_csv
        for line, row in csv_rows(reports_path, REPORT_COLUMNS):
            where = f"{reports_path} line {line}"

            def build(row: dict[str, str] | str = row, where: str = where, name: str = name) -> Record:
                if isinstance(row, str):
                    raise DataError(f"{where}: {row}")
                volume = row["VolumeName"].strip()
                where = f"{where} ({volume or 'no VolumeName'})"
                try:
                    image = volume_path(dataset, volume)
                except ValueError as e:
                    raise DataError(f"{where}: {e}") from e
                findings, impressions = _field(row["Findings_EN"]), _field(row["Impressions_EN"])
                parts = [findings, impressions] if target == "findings_impressions" else [findings]
                answer = "\n".join(p for p in parts if p)
                if not answer:
                    wanted = "Findings_EN or Impressions_EN" if target == "findings_impressions" else "Findings_EN"
                    raise DataError(f"{where}: empty report; expected text in {wanted} (not 'Not given.')")
                meta: dict[str, object] = {"split": name}
                if meta_index is not None:
                    meta.update(_meta(*_lookup(meta_index, meta_path, volume, where)))
                rec: Record = {
                    "id": volume.removesuffix(".gz").removesuffix(".nii"), "image": str(image), "task": "report",
                    "question": REPORT_QUESTION, "answer": answer, "meta": meta,
                }  # fmt: skip
                if label_index is not None:
                    rec["labels"] = _labels(*_lookup(label_index, labels_path, volume, where))
                return rec

            yield where, build


@DATASETS.register("ct_rate")
class CTRate(DatasetFormat):
    name = "ct_rate"
    order = 40
    splits = CT_RATE_SPLITS
    train_split = "train"
    help = "a CT-RATE folder holding radiology_text_reports/, or its parent holding dataset/"

    def detect(self, source: Path) -> bool:
        if source.is_dir():
            return find_ct_rate_dataset(source) is not None
        if source.suffix.lower() == ".csv" and set(REPORT_COLUMNS) <= set(csv_header(source)):
            raise DataError(
                f"{source} is a CT-RATE reports CSV; pass the CT-RATE root (the folder holding dataset/ "
                "or radiology_text_reports/) instead"
            )
        return False

    def base_dir(self, source: Path) -> Path | None:
        return None  # volume paths are absolute already

    def candidates(
        self, source: Path, *, split: str | None, data_root: Path | None, options: Mapping[str, Any]
    ) -> Iterator[Candidate]:
        return ct_rate_candidates(source, split, options.get("ct_rate_target", "findings"))
