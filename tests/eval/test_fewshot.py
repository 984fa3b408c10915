"""Tests of medvlm3d.eval.fewshot: slice subsets (random, Vote-MI) and their masks inside the
model, few-shot retrieval, the three-row table and `medvlm3d eval --protocol voteMI`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from medvlm3d import build_model
from medvlm3d.cli import main
from medvlm3d.data.errors import DataError
from medvlm3d.eval.fewshot import (example_prefix, fewshot_table, format_fewshot_table, random_keep, restrict_slices,
                                   retrieve_examples, sample_keep, study_embeddings, vote_mi_keep)
from medvlm3d.eval.runner import classify_record, eval_dataset, label_set, task_records


@pytest.fixture(scope="module")
def model(tiny_cfg: Any) -> Any:
    torch.manual_seed(0)
    return build_model(tiny_cfg("eval.max_new_tokens=4"))


@pytest.fixture(scope="module")
def samples(model: Any, phantom_records: list[dict]) -> list[dict]:
    recs = task_records(phantom_records, "classify")
    labels = label_set(recs)
    return list(eval_dataset(model, [classify_record(r, labels) for r in recs], "vqa_closed"))


def test_random_keep_per_plane_and_seeded() -> None:
    mask = torch.tensor([True] * 10 + [False] * 2)
    plane = torch.tensor([0] * 6 + [1] * 4 + [0, 0])
    keep = random_keep(mask, plane, 3, torch.Generator().manual_seed(1))
    assert int((keep & (plane == 0)).sum()) == 3 and int((keep & (plane == 1)).sum()) == 3
    assert not bool((keep & ~mask).any())  # padded slices never kept
    again = random_keep(mask, plane, 3, torch.Generator().manual_seed(1))
    assert torch.equal(keep, again)
    assert int(random_keep(mask, plane, 8, torch.Generator()).sum()) == 10  # capped at the plane's slices
    with pytest.raises(ValueError, match="k must be >= 1"):
        random_keep(mask, plane, 0, torch.Generator())
    with pytest.raises(ValueError, match="mask and plane"):
        random_keep(mask, plane[:5], 2, torch.Generator())


def test_vote_mi_keep_matches_vote_mi_picks(model: Any, samples: list[dict]) -> None:
    from medvlm3d.data.select.votek import select_slices

    s = samples[0]
    mask = torch.ones(16, dtype=torch.bool)
    keep = vote_mi_keep(model, s["slices"][0], mask, s["slice_plane"][0], 3)
    assert int(keep.sum()) == 3
    # num_slices 0 and slice_size = (H, W): the stack is the volume's axial slices, so the standalone
    # selection on the volume (same k neighbours, same features) picks the same slices
    ref = select_slices(s["volume"][0], 3, num_neighbours=model.cfg.model.vote_mi.k,
                        feature_size=model.cfg.model.vote_mi.feature_size)
    assert sorted(keep.nonzero().flatten().tolist()) == sorted(ref["axial"]["indices"])


def test_restricted_slices_carry_all_tgis_mass(model: Any, samples: list[dict]) -> None:
    batch = samples[:3]
    gen = torch.Generator().manual_seed(0)
    keeps = [sample_keep(model, s, "random", 3, gen) for s in batch[:2]]
    keeps.append(sample_keep(model, batch[2], "vote_mi", 3, gen))
    assert all(k.shape == (1, 16) and int(k.sum()) == 3 for k in keeps)
    with restrict_slices(model, keeps):
        out = model.generate(volume=[s["volume"][0] for s in batch], prompt=[s["question"] for s in batch],
                             max_new_tokens=1)
    assert "encode_images" not in vars(model)  # the method is back
    for scores, keep in zip(out.scores, keeps):
        assert torch.equal(scores > 0, keep[0])  # TG-IS mass only on the kept slices
        assert float(scores.sum()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="do not fit"), restrict_slices(model, keeps[:1]):
        model.generate(volume=[s["volume"][0] for s in batch], prompt=[s["question"] for s in batch], max_new_tokens=1)


def test_retrieve_examples_nearest_diverse_and_excluding() -> None:
    support = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, 0.12], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    query = torch.tensor([1.0, 0.0])
    exclude = torch.tensor([True, False, False, False, False, False])
    picks = retrieve_examples(query, support, 2, exclude)
    assert len(picks) == 2 and 0 not in picks and 4 not in picks  # never the excluded, never the farthest
    sims = [float(torch.nn.functional.cosine_similarity(support[i], query, dim=0)) for i in picks]
    assert sims == sorted(sims)  # most similar last
    assert retrieve_examples(query, support, 0) == []
    with pytest.raises(DataError, match="only 1 support"):
        retrieve_examples(query, support, 2, torch.tensor([True] * 5 + [False]))
    prefix = example_prefix([("Q1?", "A. x"), ("Q2?", "B. y")])
    assert prefix == "Example: Q1? Answer: A. x\nExample: Q2? Answer: B. y\n"


def test_study_embeddings(model: Any, samples: list[dict]) -> None:
    enc = study_embeddings(model, samples[:2], "encoder")
    inten = study_embeddings(model, samples[:2], "intensity")
    assert enc.shape == (2, model.encoder3d.out_dim) and inten.shape[0] == 2 and torch.isfinite(inten).all()
    with pytest.raises(ValueError, match="embedding must be"):
        study_embeddings(model, samples[:1], "clip")


def test_fewshot_table_three_rows(model: Any, phantom_records: list[dict]) -> None:
    rows = fewshot_table(model, phantom_records, None, k_slices=3, shots=(0, 2), seed=0, batch_size=6)
    assert [r["selection"] for r in rows] == ["random", "vote_mi", "tgis"]
    for r in rows:
        assert r["n"] == 6 and set(r["accuracy"]) == {"0-shot", "2-shot"}
        assert all(0.0 <= v <= 1.0 for v in [*r["accuracy"].values(), *r["balanced_accuracy"].values()])
    assert rows[0]["kept_slices"] == rows[1]["kept_slices"] == [3] * 6  # k slices seen per study
    assert rows[2]["kept_slices"] == [None] * 6
    text = format_fewshot_table(rows)
    assert "vote_mi" in text and "2-shot acc" in text and "+0.0" in text.splitlines()[3]  # random vs itself
    with pytest.raises(ValueError, match="k_slices"):
        fewshot_table(model, phantom_records, k_slices=0)
    with pytest.raises(DataError, match="no records with a 'label'"):
        fewshot_table(model, [r for r in phantom_records if r["task"] == "vqa"])


def test_cli_vote_mi_protocol(model: Any, phantom_manifest: Path, tmp_path: Path, capsys) -> None:
    model.save_pretrained(str(tmp_path / "ckpt"))
    rc = main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(phantom_manifest), "--task", "classify",
               "--protocol", "voteMI", "--k-slices", "2", "--shots", "0", "1", "--out", str(tmp_path / "fs")])
    out = capsys.readouterr().out
    assert rc == 0 and "Vote-MI protocol" in out and "1-shot acc" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Vote-MI protocol"))
    assert [line.split()[0] for line in lines[start + 3 : start + 6]] == ["random", "vote_mi", "tgis"]
    assert (tmp_path / "fs" / "fewshot.json").is_file()
