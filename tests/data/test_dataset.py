"""Tests for medvlm3d.data.dataset.StudyDataset on tiny NIfTI files, and slice_targets."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from medvlm3d.data import volume as volume_mod
from medvlm3d.data.collate import Collator
from medvlm3d.config import DataConfig
from medvlm3d.data.dataset import StudyDataset, slice_targets
from medvlm3d.data.errors import DataError
from medvlm3d.data.prompts import IGNORE_INDEX, encode_prompt, image_token_id
from medvlm3d.data.tokenizer import train_tokenizer

N_IMG_TOK = 3
NATIVE_DEPTH = 20
CFG = dict(size=(8, 16, 16), slice_size=(16, 16), num_slices=0, planes=("axial",), modality="ct")


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerFast:
    texts = ["Which organ shows the lesion? Choices: A. liver B. spleen C. kidney D. lung", "B. spleen",
             "Describe the findings.", "A small lesion in the liver."] * 5
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def nifti(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two RAS NIfTI volumes, 16 x 16 x 20 (x, y, z), in HU."""
    root = tmp_path_factory.mktemp("nii")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        data = rng.uniform(-1000, 1000, size=(16, 16, NATIVE_DEPTH)).astype(np.float32)
        p = root / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(p))
        paths.append(str(p))
    return paths


def records(paths: list[str]) -> list[dict]:
    return [
        {"id": "vqa-1", "image": paths[0], "task": "vqa", "question": "Which organ shows the lesion?",
         "answer": "spleen", "choices": ["liver", "spleen", "kidney", "lung"], "answer_choice": "B",
         "slice_labels": [6, 7, 8]},
        {"id": "rep-2", "image": [paths[0], paths[1]], "task": "report", "question": "Describe the findings.",
         "answer": "A small lesion in the liver."},
    ]


def test_sample_contents(tok, nifti) -> None:
    ds = StudyDataset(records(nifti), DataConfig(**CFG), tok, N_IMG_TOK)
    assert len(ds) == 2
    s = ds[0]
    assert s["id"] == "vqa-1"
    assert s["volume"].shape == (1, 1, 8, 16, 16)
    assert s["slices"].shape == (1, 8, 1, 16, 16)
    for key in ("slice_plane", "slice_index", "slice_pos", "slice_series", "slice_target"):
        assert s[key].shape == (1, 8)
    assert s["question"] == "Which organ shows the lesion? Choices: A. liver B. spleen C. kidney D. lung"
    assert s["target"] == "B. spleen"
    prompt = encode_prompt(tok, s["question"], N_IMG_TOK)
    assert s["input_ids"][: len(prompt)].tolist() == prompt
    assert (s["input_ids"] == image_token_id(tok)).sum() == N_IMG_TOK
    sup = s["labels"][s["labels"] != IGNORE_INDEX]
    assert tok.decode(sup, skip_special_tokens=True) == "B. spleen"
    assert s["question_ids"].tolist() == tok(s["question"], add_special_tokens=False)["input_ids"]
    assert s["record"]["id"] == "vqa-1"


def test_slice_target_mapping(tok, nifti) -> None:
    s = StudyDataset(records(nifti), DataConfig(**CFG), tok, N_IMG_TOK)[0]
    # axial slice j of 8 -> native index floor((j + 0.5) / 8 * 20) = 1, 3, 6, 8, 11, 13, 16, 18
    native = [math.floor((j + 0.5) / 8 * NATIVE_DEPTH) for j in range(8)]
    expected = [1.0 if n in (6, 7, 8) else 0.0 for n in native]
    assert expected == [0, 0, 1, 1, 0, 0, 0, 0]
    assert s["slice_target"][0].tolist() == expected
    assert s["has_slice_target"].tolist() == [True]


def test_multi_image_record_and_collate(tok, nifti) -> None:
    ds = StudyDataset(records(nifti), DataConfig(**CFG), tok, N_IMG_TOK)
    s = ds[1]
    assert s["volume"].shape[0] == 2 and s["slices"].shape[:2] == (2, 8)
    assert (s["input_ids"] == image_token_id(tok)).sum() == 2 * N_IMG_TOK
    assert s["question"] == "Describe the findings." and s["target"] == "A small lesion in the liver."
    assert s["has_slice_target"].tolist() == [False, False]
    batch = Collator(tok.pad_token_id)([ds[0], s])
    assert batch["image_to_sample"].tolist() == [0, 1, 1]
    assert batch["volumes"].shape == (3, 1, 8, 16, 16)


def test_open_mode(tok, nifti) -> None:
    s = StudyDataset(records(nifti), DataConfig(task="vqa_open", **CFG), tok, N_IMG_TOK)[0]
    assert (s["question"], s["target"]) == ("Which organ shows the lesion?", "spleen")
    s = StudyDataset(records(nifti), DataConfig(vqa_mode="open", **CFG), tok, N_IMG_TOK)[0]
    assert s["target"] == "spleen"


def test_missing_file_names_record(tok, nifti, tmp_path) -> None:
    bad = {**records(nifti)[1], "id": "gone-9", "image": str(tmp_path / "nope.nii.gz")}
    ds = StudyDataset([records(nifti)[0], bad], DataConfig(**CFG), tok, N_IMG_TOK)
    with pytest.raises(DataError, match="gone-9"):
        ds[1]
    # skip_bad_records: validate() lists it, drop_bad_records() removes it
    ds = StudyDataset([records(nifti)[0], bad], DataConfig(skip_bad_records=True, **CFG), tok, N_IMG_TOK)
    found = ds.validate()
    assert [rid for rid, _ in found] == ["gone-9"] and "nope.nii.gz" in found[0][1]
    assert ds.drop_bad_records() == 1
    assert len(ds) == 1 and ds[0]["id"] == "vqa-1"


def test_text_errors_name_record(tok, nifti) -> None:
    rec = {**records(nifti)[0], "choices": None}
    with pytest.raises(DataError, match="vqa-1.*choices"):
        StudyDataset([rec], DataConfig(task="vqa_closed", **CFG), tok, N_IMG_TOK)[0]
    long_q = {**records(nifti)[1], "question": "Describe the findings. " * 40}
    with pytest.raises(DataError, match="rep-2.*max_len"):
        StudyDataset([long_q], DataConfig(max_text_len=32, **CFG), tok, N_IMG_TOK)[0]


def test_rescale_passed_to_loader(tok, nifti, monkeypatch) -> None:
    seen = {}
    real = volume_mod.load_study

    def spy(path, cfg, train=False, **kw):
        seen.update(kw, train=train)
        return real(path, cfg, train=train, **kw)

    monkeypatch.setattr(volume_mod, "load_study", spy)
    rec = {**records(nifti)[0], "meta": {"RescaleSlope": "1", "RescaleIntercept": "-1024"}}
    StudyDataset([rec], DataConfig(**CFG), tok, N_IMG_TOK, train=True)[0]
    assert seen == {"rescale": (1.0, -1024.0), "train": True}
    seen.clear()
    StudyDataset(records(nifti)[:1], DataConfig(**CFG), tok, N_IMG_TOK)[0]
    assert "rescale" not in seen


def test_constructor_errors(tok) -> None:
    with pytest.raises(ValueError, match="num_image_tokens"):
        StudyDataset([], DataConfig(**CFG), tok, 0)
    with pytest.raises(ValueError, match="DataConfig"):
        StudyDataset([], {"size": (8, 16, 16)}, tok, 2)  # type: ignore[arg-type]


def test_slice_targets_planes_and_nesting() -> None:
    plane = torch.tensor([[0, 0, 0, 1], [0, 0, 0, 1]])
    pos = torch.tensor([[1 / 6, 3 / 6, 5 / 6, 0.5]] * 2)
    # native depth 9 -> axial slices map to 1, 4, 7; the coronal slice is never a target
    tgt, has = slice_targets([[4], [1, 7]], plane, pos, [9, 9], "r")
    assert tgt.tolist() == [[0, 1, 0, 0], [1, 0, 1, 0]]
    assert has.tolist() == [True, True]
    tgt, has = slice_targets([4], plane[:1, 3:], pos[:1, 3:], [9], "r")  # no axial slice
    assert has.tolist() == [False] and tgt.sum() == 0
    tgt, has = slice_targets(None, plane, pos, [9, 9], "r")
    assert has.tolist() == [False, False]
    with pytest.raises(DataError, match="'r'.*\\[0, 8\\]"):
        slice_targets([9], plane, pos, [9, 9], "r")
    with pytest.raises(DataError, match="'r'.*2 images"):
        slice_targets([[1], [2], [3]], plane, pos, [9, 9], "r")
