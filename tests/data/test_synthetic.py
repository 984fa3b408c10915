"""Tests for medvlm3d.data.synthetic: determinism, lesion ground truth in voxels and RAS world
coordinates, balanced answer priors (no text-only shortcut), valid manifests and the CLI verb."""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvlm3d.cli import main
from medvlm3d.data.readers import read_records, validate_record
from medvlm3d.data.synthetic import (
    PROPERTIES,
    check_disjoint_seeds,
    corpus_texts,
    make_dataset,
    make_study,
    report_labels,
    split_seeds,
    study_records,
)

SMALL = (16, 32, 32)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_study_and_different_seeds_differ() -> None:
    a, b, c = make_study(7, SMALL), make_study(7, SMALL), make_study(8, SMALL)
    assert a.hu.dtype == np.int16 and a.hu.shape == SMALL
    assert _digest(a.hu) == _digest(b.hu) and a.report == b.report and a.lesions == b.lesions
    assert a.vqa_items() == b.vqa_items()
    assert _digest(a.hu) != _digest(c.hu)
    # CT-like values: air outside, soft tissue inside, bone present
    assert a.hu[0, 0, 0] < -900 and abs(int(np.median(a.hu[:, 16, 16])) - 45) < 40 and a.hu.max() > 500


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_lesions_are_where_the_labels_say(seed: int) -> None:
    study = make_study(seed, n_lesions=1 + seed % 2)
    healthy = make_study(seed, n_lesions=1 + seed % 2, paint_lesions=False)
    diff = study.hu.astype(np.int32) - healthy.hu
    d, h, w = study.shape
    img = study.to_nifti()
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    mid_world = (img.affine @ [(w - 1) / 2, 0, 0, 1])[0]
    covered = np.zeros_like(diff, dtype=bool)
    for les in study.lesions:
        sign = 1 if les.kind == "hyperdense" else -1
        z_lo, z_hi = les.slice_range
        zz, yy, xx = np.nonzero(sign * diff >= 70)
        own = (zz >= z_lo) & (zz <= z_hi) & ((xx < w / 2) if les.side == "left" else (xx >= w / 2))
        assert own.sum() > 10
        covered[zz[own], yy[own], xx[own]] = True
        assert zz[own].min() == z_lo and zz[own].max() == z_hi  # exact recorded slice range
        assert (zz[own] >= d / 2).all() if les.position == "upper" else (zz[own] < d / 2).all()
        # world x of every lesion voxel: RAS+ means patient left is -x (below the midline)
        world = img.affine @ np.stack([xx[own], yy[own], zz[own], np.ones(own.sum())])
        assert (world[0] < mid_world).all() if les.side == "left" else (world[0] > mid_world).all()
    assert (covered == (diff != 0)).all()  # nothing else changed


def test_nifti_round_trip_keeps_axes(tmp_path: Path) -> None:
    study = make_study(11, SMALL, n_lesions=1)
    path = study.save(tmp_path / "s.nii.gz")
    img = nib.as_closest_canonical(nib.load(path))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    back = np.asarray(img.dataobj).transpose(2, 1, 0)  # [X, Y, Z] -> [D, H, W]
    assert back.dtype == np.int16 and (back == study.hu).all()
    assert np.allclose(img.header.get_zooms(), study.spacing[::-1])


def test_answer_priors_are_balanced_and_text_alone_does_not_answer() -> None:
    studies = [make_study(s, SMALL) for s in split_seeds(3, 300)]
    counts = Counter(len(s.lesions) for s in studies)
    assert all(80 <= counts[k] <= 120 for k in (0, 1, 2)), counts
    answers: dict[str, Counter] = defaultdict(Counter)
    by_text: dict[str, Counter] = defaultdict(Counter)
    letters: Counter = Counter()
    for s in studies:
        for item in s.vqa_items(6):
            answers[item["question_type"]][item["answer"]] += 1
            by_text[item["question"]][item["answer"]] += 1
            if "choices" in item:
                letters[item["answer_choice"]] += 1
                assert len(set(item["choices"])) == 4 and item["choices"]["ABCD".index(item["answer_choice"])] == item["answer"]
    for qtype, values in [("presence", ("yes", "no")), ("count", ("0", "1", "2"))] + list(PROPERTIES.items()):
        total = sum(answers[qtype].values())
        for v in values:
            assert abs(answers[qtype][v] / total - 1 / len(values)) < 0.1, (qtype, answers[qtype])
    assert all(abs(letters[k] / sum(letters.values()) - 0.25) < 0.05 for k in "ABCD"), letters
    # the best text-only guess (majority answer per question text) stays near chance
    total = sum(sum(c.values()) for c in by_text.values())
    assert sum(max(c.values()) for c in by_text.values()) / total < 0.6


def test_two_lesions_are_named_by_a_property_they_differ_in() -> None:
    for seed in range(20):
        study = make_study(seed, SMALL, n_lesions=2)
        a, b = study.lesions
        assert getattr(a, study.referent) != getattr(b, study.referent)
        for item in study.vqa_items(8):
            idx = item["meta"]["lesion"]
            if idx is None:
                assert item["slice_labels"] == sorted(set(a.slice_labels) | set(b.slice_labels))
                continue
            les = study.lesions[idx]
            assert item["question_type"] != study.referent
            assert f" {getattr(les, study.referent)} " in item["question"]
            assert item["slice_labels"] == les.slice_labels and item["answer"] == getattr(les, item["question_type"])


def test_records_validate_and_reports_parse() -> None:
    for seed in range(12):
        study = make_study(seed, SMALL)
        recs = study_records(study, f"phantom_{seed:05d}", "volumes/x.nii.gz")
        for rec in recs:
            assert validate_record(rec, "test") == rec
            assert ("slice_labels" in rec) == bool(study.lesions)
        assert [r["id"] for r in recs][:2] == [f"phantom_{seed:05d}_report", f"phantom_{seed:05d}_q0"]
        assert report_labels(recs[0]["answer"]) == {"lesion": int(bool(study.lesions)), "count": len(study.lesions)}
    assert report_labels("Findings: No focal lesion.") == {"lesion": 0, "count": 0}


def test_dataset_is_byte_identical_per_seed_and_reads_back(tmp_path: Path) -> None:
    m1 = make_dataset(tmp_path / "a", 4, seed=5, shape=SMALL)
    m2 = make_dataset(tmp_path / "b", 4, seed=5, shape=SMALL)
    assert _tree_digest(m1.parent) == _tree_digest(m2.parent)
    m3 = make_dataset(tmp_path / "c", 4, seed=6, shape=SMALL)
    assert _tree_digest(m1.parent) != _tree_digest(m3.parent)
    recs = read_records(m1)
    assert len({r["id"] for r in recs}) == len(recs) and {r["task"] for r in recs} == {"report", "vqa"}
    assert all(Path(r["image"]).is_file() for r in recs)
    raw = json.loads(m1.read_text().splitlines()[0])
    assert raw["image"] == "volumes/phantom_00000.nii.gz"
    texts = corpus_texts(recs)
    assert any("Choices: A." in t for t in texts) and any(t.startswith("Findings:") for t in texts)


def test_split_seeds_are_disjoint() -> None:
    assert not set(split_seeds(0, 1000)) & set(split_seeds(1, 1000))
    check_disjoint_seeds((0, 1000), (1, 1000))
    with pytest.raises(ValueError, match="share study seed"):
        check_disjoint_seeds((0, 10), (0, 5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=0, shape=(4, 64, 64)), "shape"),
        (dict(seed=0, shape=(32, 64)), "shape"),
        (dict(seed=-1), "seed"),
        (dict(seed=0, lesion_probs=(0.5, 0.5, 0.5)), "lesion_probs"),
        (dict(seed=0, n_lesions=3), "n_lesions"),
        (dict(seed=0, spacing=(1.0, 0.0, 1.0)), "spacing"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_study(**kwargs)


def test_bad_dataset_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n must be"):
        make_dataset(tmp_path, 0)
    with pytest.raises(ValueError, match="max_items"):
        make_study(0, SMALL).vqa_items(1)
    with pytest.raises(ValueError, match="forms"):
        make_study(0, SMALL).vqa_items(4, forms=("multiple",))


def test_cli_synth_writes_a_valid_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p"
    assert main(["synth", "--out", str(out), "--n", "5"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "manifest.jsonl") in printed and "studies: 5" in printed
    assert len(list((out / "volumes").glob("*.nii.gz"))) == 5
    recs = read_records(out / "manifest.jsonl")
    assert sum(r["task"] == "report" for r in recs) == 5
    assert nib.load(recs[0]["image"]).shape == (64, 64, 32)  # [X, Y, Z] of the default (32, 64, 64)


def test_cli_synth_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path), "--n", "0"]) == 2
    assert "n must be between 1" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path), "--shape", "4", "8", "8"]) == 2
    assert "shape must be" in capsys.readouterr().err
    assert not (tmp_path / "manifest.jsonl").exists()


@pytest.mark.slow
def test_package_loader_sees_the_lesion_side(tmp_path: Path) -> None:
    volume = pytest.importorskip("medvlm3d.data.volume")
    study = make_study(2, n_lesions=1)
    les = study.lesions[0]
    path, twin = study.save(tmp_path / "s.nii.gz"), make_study(2, n_lesions=1, paint_lesions=False)
    vol = volume.load_volume(path, size=study.shape)[0].numpy()
    healthy = volume.load_volume(twin.save(tmp_path / "h.nii.gz"), size=study.shape)[0].numpy()
    assert vol.shape == study.shape
    zz, yy, xx = np.nonzero(np.abs(vol - healthy) > 0.02)  # lesion contrast >= 80 HU, window 2000 HU
    assert zz.min() == les.slice_range[0] and zz.max() == les.slice_range[1]
    assert (xx < study.shape[2] / 2).all() if les.side == "left" else (xx >= study.shape[2] / 2).all()
