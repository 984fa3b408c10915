"""Tests of medvlm3d.eval.fewshot: slice subsets (random, Vote-MI) and their masks inside the
model, few-shot retrieval, the three-row table and `medvlm3d eval --protocol voteMI`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from medvlm3d import build_model
from medvlm3d.cli import main
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.eval.fewshot import (annotate_support, examples_for, fewshot_prompt, fewshot_table, format_fewshot_table,
                                   keep_slices, restrict_sample, slices_per_plane, study_embeddings)
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


def test_annotate_once_vote_k_or_random_and_examples_skip_the_query() -> None:
    from medvlm3d.data.select.votek import vote_k

    emb = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, 0.12], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    picks = annotate_support(emb, 3, "vote_k", k=2)
    assert picks == vote_k(emb, k=2, num_picks=3).picks and len(set(picks)) == 3
    rand = annotate_support(emb, 3, "random", seed=4)
    assert rand == annotate_support(emb, 3, "random", seed=4) and len(set(rand)) == 3
    with pytest.raises(DataError, match="support set has 6"):
        annotate_support(emb, 7)
    images = ["a", "b", "c", "a", "d", "e"]
    assert examples_for("a", [0, 3, 2, 5], images, 2) == [2, 5]  # both studies of image "a" skipped
    assert examples_for("z", [0, 3, 2], images, 2) == [0, 3]  # pick order kept
    with pytest.raises(DataError, match="only 1 annotated"):
        examples_for("a", [0, 3, 2], images, 2)
    assert fewshot_prompt([], "Q?") == "Q?"
    assert fewshot_prompt([("Q1?", "A. x"), ("Q2?", "B. y")], "Q?") == (
        "Images 1-2 are examples; image 3 is the question's.\nImage 1: Q1? Answer: A. x\n"
        "Image 2: Q2? Answer: B. y\nImage 3: Q?")


def test_restricted_volume_holds_only_the_kept_slices(model: Any, samples: list[dict]) -> None:
    s = samples[0]
    keep = keep_slices(model, s, "random", 3, 0)
    seen = restrict_sample(model, s, keep)
    kept = set(s["slice_index"][0, keep[0]].tolist())  # axial, num_slices 0: slice j = voxel plane j
    for d in range(s["volume"].shape[2]):
        plane = seen["volume"][0, 0, d]
        assert torch.equal(plane, s["volume"][0, 0, d]) if d in kept else not plane.any()
    # what the model sees does not depend on the slices left out: change them, same restricted sample
    other = dict(s, volume=s["volume"].clone(), slices=s["slices"].clone())
    out = [d for d in range(s["volume"].shape[2]) if d not in kept]
    other["volume"][0, 0, out] += 0.5
    other["slices"][0, out] += 0.5
    again = restrict_sample(model, other, keep)
    assert torch.equal(again["volume"], seen["volume"]) and torch.equal(again["slices"], seen["slices"])


def test_2d_only_sees_exactly_the_selected_slices(tiny_cfg: Any, phantom_records: list[dict]) -> None:
    torch.manual_seed(0)
    m2d = build_model(tiny_cfg("model.variant=2d_only", "eval.max_new_tokens=2"))
    assert slices_per_plane(m2d, None) == 3  # vote_mi.num_picks 3, one plane
    with pytest.raises(ConfigError, match="num_picks=3"):
        slices_per_plane(m2d, 2)
    recs = task_records(phantom_records, "classify")
    s = eval_dataset(m2d, [classify_record(r, label_set(recs)) for r in recs[:1]], "vqa_closed")[0]
    keep = keep_slices(m2d, s, "random", 3, 0)
    seen = restrict_sample(m2d, s, keep)
    assert seen["slice_keep"].tolist() == [[0, 1, 2]] and seen["slice_index"][0].tolist() == keep[0].tolist()
    # brainmd_votemi's layout: three planes, num_picks 6 -> 2 slices per plane
    m3p = build_model(tiny_cfg("model.variant=2d_only", "data.planes=[axial,coronal,sagittal]",
                               "model.vote_mi.num_picks=6", "eval.max_new_tokens=2"))
    assert slices_per_plane(m3p, None) == 2
    s3 = eval_dataset(m3p, [classify_record(r, label_set(recs)) for r in recs[:1]], "vqa_closed")[0]
    seen = restrict_sample(m3p, s3, keep_slices(m3p, s3, "vote_mi", 2, 0))
    assert seen["slice_plane"][0].bincount().tolist() == [2, 2, 2] and seen["slice_keep"][0].tolist() == list(range(6))
    rows = fewshot_table(m3p, phantom_records, shots=(0, 1), batch_size=6)
    assert [r["selection"] for r in rows] == ["random", "vote_mi"]  # no TG-IS in a 2d_only model
    assert rows[0]["kept_slices"] == [6] * 6


def test_examples_carry_their_restricted_images_and_vote_k_runs_once(model: Any, phantom_records: list[dict],
                                                                      monkeypatch) -> None:
    import medvlm3d.eval.fewshot as fs

    calls, seen_inputs = [], []
    real_vote_k, real_generate = fs.vote_k, fs.generate_samples
    monkeypatch.setattr(fs, "vote_k", lambda *a, **k: calls.append(1) or real_vote_k(*a, **k))

    def spy(model, inputs, prompts=None, **kw):
        seen_inputs.append((list(inputs), list(prompts)))
        return real_generate(model, inputs, prompts=prompts, **kw)

    monkeypatch.setattr(fs, "generate_samples", spy)
    rows = fewshot_table(model, phantom_records, k_slices=3, shots=(0, 2), batch_size=6)
    assert len(calls) == 1  # vote-k annotates once, for every query and row
    assert [r["examples"] for r in rows] == ["random", "vote_k", "vote_k"]
    assert rows[1]["annotated"] == rows[2]["annotated"] and len(rows[1]["annotated"]) == 3  # 2 shots + 1 spare
    inputs, prompts = seen_inputs[3]  # vote_mi row, 2 shots
    by_id = {r["id"]: r for r in phantom_records}
    for x, p in zip(inputs, prompts):
        assert x["volume"].shape[0] == 3 and x["slices"].shape[:2] == (3, 3)  # two examples + the query
        assert p.startswith("Images 1-2 are examples") and p.count("Answer: ") == 2
        assert all(not x["volume"][i, 0, d].any() for i in range(3) for d in range(16)
                   if d not in set(x["slice_index"][i].tolist()))  # every image seen through its kept slices
    ids = [r for r in rows[1]["annotated"]]
    first = [i for i in ids if by_id[i]["image"] != by_id[inputs[0]["id"]]["image"]][:2]
    assert f"Answer: {'A' if by_id[first[0]]['label'] == 'abnormal' else 'B'}." in prompts[0].splitlines()[1]


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
    assert text.splitlines()[-1].startswith("note: differs from BrainMD")
    with pytest.raises(ValueError, match="k_slices"):
        fewshot_table(model, phantom_records, k_slices=0)
    with pytest.raises(DataError, match="no records with a 'label'"):
        fewshot_table(model, [r for r in phantom_records if r["task"] == "vqa"])


def test_cli_vote_mi_protocol(model: Any, phantom_manifest: Path, tmp_path: Path, capsys) -> None:
    model.save_pretrained(str(tmp_path / "ckpt"))  # 2e3: the three rows
    rc = main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(phantom_manifest), "--task", "classify",
               "--protocol", "voteMI", "--k-slices", "2", "--shots", "0", "1", "--cross", "--out", str(tmp_path / "fs")])
    out = capsys.readouterr().out
    assert rc == 0 and "Vote-MI protocol" in out and "1-shot acc" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Vote-MI protocol"))
    table = [line.split() for line in lines[start + 3 : start + 8]]
    assert [(r[0], r[-7]) for r in table] == [("random", "random"), ("vote_mi", "vote_k"), ("tgis", "vote_k"),
                                             ("random", "vote_k"), ("vote_mi", "random")]  # --cross: 2 more rows
    assert (tmp_path / "fs" / "fewshot.json").is_file()
