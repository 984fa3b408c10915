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
from medvlm3d.eval.fewshot import (example_prefix, fewshot_table, format_fewshot_table, keep_slices, restrict_sample,
                                   retrieve_examples, study_embeddings)
from medvlm3d.eval.runner import classify_record, eval_dataset, generate_samples, label_set, task_records


@pytest.fixture(scope="module")
def model(tiny_cfg: Any) -> Any:
    torch.manual_seed(0)
    return build_model(tiny_cfg("eval.max_new_tokens=4"))


@pytest.fixture(scope="module")
def samples(model: Any, phantom_records: list[dict]) -> list[dict]:
    recs = task_records(phantom_records, "classify")
    labels = label_set(recs)
    return list(eval_dataset(model, [classify_record(r, labels) for r in recs], "vqa_closed"))


def test_random_keep_per_plane_seeded_and_off_the_global_rng(model: Any) -> None:
    sample = {"slices": torch.rand(1, 10, 1, 8, 8), "slice_plane": torch.tensor([[0] * 6 + [1] * 4])}
    state = torch.get_rng_state()
    keep = keep_slices(model, sample, "random", 3, index=5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never drawn from
    plane = sample["slice_plane"][0]
    assert keep.shape == (1, 6) and (plane[keep[0]] == 0).sum() == 3 and (plane[keep[0]] == 1).sum() == 3
    assert keep[0].unique().numel() == 6
    assert torch.equal(keep, keep_slices(model, sample, "random", 3, index=5, seed=1))
    assert not torch.equal(keep, keep_slices(model, sample, "random", 3, index=6, seed=1))  # per sample
    with pytest.raises(ValueError, match="k must be >= 1"):
        keep_slices(model, sample, "random", 0, index=0)


def test_vote_mi_keep_matches_vote_mi_picks(model: Any, samples: list[dict]) -> None:
    from medvlm3d.data.select.votek import select_slices

    s = samples[0]
    keep = keep_slices(model, s, "vote_mi", 3, index=0)
    assert keep.shape == (1, 3)
    # num_slices 0 and slice_size = (H, W): the stack is the volume's axial slices, so the standalone
    # selection on the volume (same k neighbours, same features) picks the same slices
    ref = select_slices(s["volume"][0], 3, num_neighbours=model.cfg.model.vote_mi.k,
                        feature_size=model.cfg.model.vote_mi.feature_size)
    assert keep[0].tolist() == sorted(ref["axial"]["indices"])


def test_restricted_samples_carry_only_the_kept_slices(model: Any, samples: list[dict]) -> None:
    batch = samples[:3]
    keeps = [keep_slices(model, s, "random", 3, i) for i, s in enumerate(batch[:2])]
    keeps.append(keep_slices(model, batch[2], "vote_mi", 3, 2))
    seen = [restrict_sample(model, s, k) for s, k in zip(batch, keeps)]
    assert all(s["slices"].shape[1] == 3 for s in seen) and batch[0]["slices"].shape[1] == 16
    out = list(generate_samples(model, seen, batch_size=3, max_new_tokens=1, progress=False))
    for (_, sample, _, scores), keep in zip(out, keeps):
        assert scores.shape == (3,) and float(scores.sum()) == pytest.approx(1.0, abs=1e-5)
        assert sample["slice_index"][0].tolist() == keep[0].tolist()  # scores name the kept slices


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
