"""The context scorer's per-slice intensity features (tgis.scorer=context, context_features=
intensity) are computed on the data side: they equal what the model used to compute in its
forward, to 1e-6, on phantom slices (a padded batch of two studies, three planes); they follow
pre-selection and `restrict`, collate to Batch.slice_context, and the model's forward reads them
without running vote-k (and says so when a batch lacks them); `generate` computes them too."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from medvlm3d.config import VoteMIConfig
from medvlm3d.data.collate import Collator
from medvlm3d.data.dataset import StudyDataset
from medvlm3d.data.errors import DataError
from medvlm3d.data.select import context, votek
from medvlm3d.data.select.step import SelectionPlan, restrict
from medvlm3d.data.select.votek import VoteMI, intensity_features
from medvlm3d.data.select.context import (CONTEXT_FEATURES, INTENSITY_TEMPS, slice_context, soft_relations,
                                          volume_normalised)
from medvlm3d.model import medvlm, slice_scorers, tgis
from medvlm3d.model.generation import generation_batch
from medvlm3d.model.medvlm import build_model


def phantom_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """slices [2, 36, 1, 16, 16] (3 planes x 12; study 1 padded after 30), plane, mask [2, 36]."""
    g = torch.Generator().manual_seed(0)
    slices = torch.rand(2, 36, 1, 16, 16, generator=g) * 0.2
    slices[0, 3:5, :, 4:10, 4:10] += 0.7  # a "lesion" in two axial slices
    slices[1, 14:17, :, 2:8, 6:12] += 0.6
    plane = torch.arange(3).repeat_interleave(12).expand(2, 36).clone()
    mask = torch.ones(2, 36, dtype=torch.bool)
    mask[1, 30:] = False
    slices[1, 30:] = 0.0
    plane[1, 30:] = 0
    return slices, plane, mask


def in_model_features(slices: torch.Tensor, plane: torch.Tensor, mask: torch.Tensor,
                      vm: VoteMIConfig) -> torch.Tensor:
    """The reference: what ContextScorer's forward computed from the raw (padded) slices before the
    move (`intensity_inputs`, then `relations` on the volume-normalised features at 3 temperatures;
    pinned against that code in the commit that added this test), as the MLP's input [B, S, 8]."""
    feats = intensity_features(slices.float(), size=vm.feature_size, mask=mask)
    vk = torch.zeros(*mask.shape, 2)
    for i, planes in enumerate(VoteMI(vm).select(feats, mask, plane)):
        for r in planes.values():
            vk[i, :, 0] += (r.votes / r.votes.max().clamp_min(1.0)).float()
            vk[i, r.picks, 1] = 1.0
    hn = torch.nn.functional.normalize(volume_normalised(feats, mask), dim=-1)
    rel = [x.unsqueeze(-1) for t in INTENSITY_TEMPS for x in soft_relations(hn, mask, t)]
    return torch.cat(rel + [vk], dim=-1)


VM = VoteMIConfig(k=3, num_picks=4)


def test_data_side_features_equal_the_old_in_model_ones() -> None:
    """Per study on the data side (unpadded, as study_tensors computes them), then collated: the
    padded batch equals the old in-model features to 1e-6, and is exactly 0 on padding."""
    slices, plane, mask = phantom_batch()
    per_study = [slice_context(slices[i, mask[i]][None], plane[i, mask[i]][None], VM) for i in range(2)]
    assert [tuple(x.shape) for x in per_study] == [(1, 36, CONTEXT_FEATURES), (1, 30, CONTEXT_FEATURES)]
    assert all(x.dtype == torch.float32 for x in per_study)
    batched = torch.nn.utils.rnn.pad_sequence([x[0] for x in per_study], batch_first=True)
    torch.testing.assert_close(batched, in_model_features(slices, plane, mask, VM), atol=1e-6, rtol=0)
    assert torch.all(batched[1, 30:] == 0)
    torch.testing.assert_close(slice_context(slices, plane, VM, mask), batched, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ study_tensors, batch, model

CONTEXT = ("model.tgis.scorer=context", "model.tgis.context_features=intensity")


def _samples(model: Any, records: list[dict], n: int = 2) -> list[dict]:
    plan = SelectionPlan.from_config(model.cfg.model, teacher=True)
    ds = StudyDataset(records[:n], model.cfg.data, model.tokenizer, model.num_visual_tokens, selection=plan)
    return [ds[i] for i in range(n)]


def test_slice_context_follows_preselection_and_restrict(tiny_cfg, phantom_records: list[dict]) -> None:
    cfg = tiny_cfg(*CONTEXT, "model.preselect_k=6", "model.preselector=uniform")
    plan = SelectionPlan.from_config(cfg.model, teacher=True)
    assert plan.context == cfg.model.vote_mi and SelectionPlan.from_config(tiny_cfg().model).context is None
    assert SelectionPlan.from_config(tiny_cfg(*CONTEXT, "model.variant=2d_only").model).context is None
    model = build_model(cfg).eval()
    s = _samples(model, phantom_records, 1)[0]
    n_img = s["volume"].shape[0]
    assert s["slice_context"].shape == (n_img, 6, CONTEXT_FEATURES)  # over the pre-selected slices
    torch.testing.assert_close(s["slice_context"], slice_context(s["slices"], s["slice_plane"], cfg.model.vote_mi))
    cut = restrict(s, torch.arange(4).expand(n_img, 4), plan)
    assert cut["slice_context"].shape == (n_img, 4, CONTEXT_FEATURES)
    torch.testing.assert_close(cut["slice_context"], slice_context(cut["slices"], cut["slice_plane"], plan.context))
    assert not torch.allclose(cut["slice_context"], s["slice_context"][:, :4])  # recomputed, not gathered
    batch = Collator(model.tokenizer.pad_token_id)([s, cut])
    assert batch["slice_context"].shape == (2 * n_img, 6, CONTEXT_FEATURES)
    assert torch.all(batch["slice_context"][~batch["slice_mask"]] == 0)


def test_forward_runs_no_vote_k_and_needs_slice_context(tiny_cfg, phantom_records: list[dict], monkeypatch) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*CONTEXT)).eval()
    batch = Collator(model.tokenizer.pad_token_id)(_samples(model, phantom_records))
    with torch.no_grad():
        before = model(**batch)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model ran the data-side vote-k / intensity features")

    for module, name in ((votek, "vote_k"), (votek, "knn_votes"), (votek, "intensity_features"),
                         (votek.VoteMI, "select"), (context, "slice_context"), (context, "intensity_features")):
        monkeypatch.setattr(module, name, boom)
    for module in (slice_scorers, tgis, medvlm):  # nor a copy imported into the model's modules
        for name in ("vote_k", "VoteMI", "intensity_features", "slice_context"):
            monkeypatch.setattr(module, name, boom, raising=False)
    with torch.no_grad():
        out = model(**batch)
    torch.testing.assert_close(out.scores, before.scores)
    assert torch.isfinite(out.slice_logits).all()
    with pytest.raises(DataError, match="slice_context"):
        model(**{k: v for k, v in batch.items() if k != "slice_context"})


def test_generate_computes_slice_context_on_the_data_side(tiny_cfg, phantom_records: list[dict]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(*CONTEXT)).eval()
    sample = _samples(model, phantom_records, 1)[0]
    gen = model.generate(volume=sample["volume"][0], prompt=sample["question"], max_new_tokens=1)
    with torch.no_grad():
        out = model(generation_batch(model, [sample], [sample["question"]]))
    torch.testing.assert_close(gen.scores, out.scores[0])


def test_preprocessed_shards_give_the_same_slice_context(phantom_records: list[dict], tiny_cfg, tmp_path) -> None:
    """From `medvlm3d preprocess` shards (the stored selection; slice_context recomputed on load
    when the shard reader does not hand it back) the samples carry the raw path's slice_context."""
    from medvlm3d.data.preprocess import run_preprocess
    from medvlm3d.data.readers import read_records
    from medvlm3d.data.synthetic import make_dataset
    from medvlm3d.model.llm import load_tokenizer

    phantoms = make_dataset(tmp_path / "ph", 2, seed=3, shape=(12, 24, 24))
    extra = (*CONTEXT, "data.size=[8,16,16]", "data.slice_size=[16,16]", "model.preselect_k=5")
    run_preprocess(phantoms, tiny_cfg(*extra), tmp_path / "pp", shard_size=2)
    records = read_records(phantoms)[:2]
    tok = load_tokenizer(tiny_cfg().model.llm)
    raw, cached = ([StudyDataset(records, c.data, tok, 2, selection=SelectionPlan.from_config(c.model, True))[i]
                    for i in range(2)]
                   for c in (tiny_cfg(*extra), tiny_cfg(*extra, f"data.preprocessed={tmp_path / 'pp'}")))
    for a, b in zip(raw, cached):
        assert a["slice_context"].shape[1] == 5
        torch.testing.assert_close(b["slice_context"], a["slice_context"], atol=1e-6, rtol=0)
