"""Stage 0 contrastive pretraining (medvlm3d.train.clip) on tiny phantom studies."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from medvlm3d.data.collate import Collator
from medvlm3d.config import RunConfig, load_config
from medvlm3d.data.dataset import StudyDataset
from medvlm3d.data.readers import read_records
from medvlm3d.data.synthetic import corpus_texts, make_dataset
from medvlm3d.data.tokenizer import train_tokenizer
from medvlm3d.model.medvlm import MedVLM
from medvlm3d.train.clip import ContrastiveModel, retrieval_accuracy
from medvlm3d.train.losses import contrastive_loss

N_STUDIES = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """8 phantom report records, a tokenizer trained on their corpus, and their samples."""
    root = tmp_path_factory.mktemp("clip")
    manifest = make_dataset(root / "data", N_STUDIES, seed=0, shape=(16, 32, 32), questions_per_study=2)
    records = read_records(str(manifest))
    tok = train_tokenizer(corpus_texts(records), root / "tok", vocab_size=400)
    cfg = load_config("tiny", layers=["stage0_clip"])
    reports = [r for r in records if r["task"] == "report"]
    assert len(reports) == N_STUDIES
    n_tok = _vlm(cfg, tok).num_visual_tokens
    samples = [StudyDataset(reports, cfg.data, tok, n_tok)[i] for i in range(N_STUDIES)]
    return {"cfg": cfg, "tok": tok, "samples": samples, "collate": Collator(tok.pad_token_id)}


def _vlm(cfg: RunConfig, tok: Any) -> MedVLM:
    torch.manual_seed(0)
    return MedVLM(cfg, tok)


def _model(setup: dict[str, Any], overrides: tuple[str, ...] = ()) -> ContrastiveModel:
    cfg = load_config("tiny", layers=["stage0_clip"], overrides=overrides) if overrides else setup["cfg"]
    return ContrastiveModel(_vlm(cfg, setup["tok"]), cfg)


def _batch(setup: dict[str, Any], idx: list[int]) -> dict[str, Any]:
    return setup["collate"]([setup["samples"][i] for i in idx])


def _params(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters())


def test_forward_keys_and_finite_loss(setup) -> None:
    model = _model(setup)
    out = model(**_batch(setup, [0, 1, 2, 3]))
    assert set(out) == {"loss", "loss_volume", "loss_slices", "logit_scale"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert torch.allclose(out["loss"], out["loss_volume"] + out["loss_slices"])
    assert out["logit_scale"].item() == pytest.approx(math.log(1 / setup["cfg"].train.contrastive_temperature))
    assert model.embed_dim == model.vlm.encoder3d.out_dim
    emb = model.embed(_batch(setup, [0, 1, 2]))
    assert {k: tuple(v.shape) for k, v in emb.items()} == {k: (3, model.embed_dim) for k in ("text", "volume", "slices")}


def test_loss_symmetric_and_order_free(setup) -> None:
    model = _model(setup).eval()
    idx = [0, 1, 2, 3, 4]
    with torch.no_grad():
        emb = model.embed(_batch(setup, idx))
        fwd = contrastive_loss(emb["volume"], emb["text"], model.logit_scale)
        assert contrastive_loss(emb["text"], emb["volume"], model.logit_scale).item() == pytest.approx(fwd.item(), rel=1e-5)
        a = model(**_batch(setup, idx))
        b = model(**_batch(setup, idx[::-1]))  # the same pairs in another order
    for key in ("loss_volume", "loss_slices"):
        assert b[key].item() == pytest.approx(a[key].item(), rel=1e-4)


def test_batch_of_one_is_refused(setup) -> None:
    model = _model(setup)
    with pytest.raises(ValueError, match="at least 2 samples"):
        model(**_batch(setup, [0]))


def test_bad_arguments(setup) -> None:
    with pytest.raises(ValueError, match="expects a MedVLM"):
        ContrastiveModel(nn.Linear(2, 2), setup["cfg"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contrastive_temperature"):
        _model(setup, ("train.contrastive_temperature=0",))
    model = _model(setup)
    batch = _batch(setup, [0, 1, 2])
    batch["image_to_sample"] = torch.tensor([0, 0, 1])  # sample 2 has no image
    with pytest.raises(ValueError, match="image_to_sample"):
        model(**batch)
    with pytest.raises(ValueError, match="at least 2 samples"):
        retrieval_accuracy(model, [_batch(setup, [0])])


def test_max_pool_ignores_padded_slices_and_bad_pool_is_refused(setup) -> None:
    model = _model(setup, ("train.contrastive_pool=max",)).eval()
    batch = _batch(setup, [0, 1, 2])
    padded = dict(batch, slices=batch["slices"].clone(), slice_mask=batch["slice_mask"].clone())
    padded["slice_mask"][:, -3:] = False
    with torch.no_grad():
        ref = model.embed(padded)["slices"]
        padded["slices"][:, -3:] = 1e3  # what sits in padded slots must not reach the embedding
        again = model.embed(padded)["slices"]
        full = model.embed(batch)["slices"]
    torch.testing.assert_close(again, ref)
    assert not torch.allclose(full, ref)  # the real slices do count
    with pytest.raises(ValueError, match="contrastive_pool"):
        load_config("tiny", layers=["stage0_clip"], overrides=("train.contrastive_pool=sum",))


def test_several_images_per_sample_are_averaged(setup) -> None:
    model = _model(setup).eval()
    three = _batch(setup, [0, 1, 2])
    two = dict(three, image_to_sample=torch.tensor([0, 0, 1]), targets=three["targets"][:2])  # sample 0: images 0, 1
    with torch.no_grad():
        single = model.embed(three)
        multi = model.embed(two)
    for key in ("volume", "slices"):
        assert torch.allclose(multi[key][0], single[key][:2].mean(0), atol=1e-5)
        assert torch.allclose(multi[key][1], single[key][2], atol=1e-5)


def test_gradients_reach_encoders_text_tower_and_temperature_not_llm(setup) -> None:
    model = _model(setup)
    model(**_batch(setup, [0, 1, 2, 3]))["loss"].backward()

    def reached(params: list[nn.Parameter]) -> bool:
        return all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)

    def used(module: nn.Module) -> list[nn.Parameter]:
        # MONAI's ViT blocks always hold a `norm_cross_attn` LayerNorm that self-attention never uses
        return [p for n, p in module.named_parameters() if p.requires_grad and "cross_attn" not in n]

    head = model.clip_head
    assert reached(used(model.vlm.encoder3d)) and reached(used(model.vlm.slice_encoder))
    assert reached(_params(head.text) + _params(head.text_proj) + _params(head.volume_proj) + _params(head.slice_proj))
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs() > 0
    for name in ("llm", "projector", "tgis"):
        comp = model.vlm.components()[name]
        assert all(not p.requires_grad and p.grad is None for p in comp.parameters()), name
    assert "clip_head" in model.components()


def test_stage_config_and_3d_only_variant(setup) -> None:
    cfg = setup["cfg"]
    assert cfg.train.stage == "stage0_clip" and cfg.data.task == "report"
    t = cfg.model.trainable
    assert (t.encoder3d, t.slice_encoder, t.llm, t.projector, t.tgis) == ("full", "full", "frozen", "frozen", "frozen")
    model = _model(setup, ("model.variant=3d_only",))
    assert model.clip_head.slice_proj is None
    out = model(**_batch(setup, [0, 1, 2]))
    assert set(out) == {"loss", "loss_volume", "logit_scale"}
    acc = retrieval_accuracy(model, [_batch(setup, [0, 1, 2])])
    assert set(acc) == {"volume_to_text", "text_to_volume", "chance", "n"} and acc["n"] == 3


@pytest.mark.slow
def test_training_lowers_loss_and_beats_chance_retrieval(setup) -> None:
    model = _model(setup)
    batch = _batch(setup, list(range(N_STUDIES)))
    before = retrieval_accuracy(model, [batch])
    texts = batch["targets"]
    expected_chance = sum(texts.count(t) for t in texts) / len(texts) ** 2  # duplicate reports count as hits
    assert before["chance"] == pytest.approx(expected_chance) and before["chance"] >= 1 / N_STUDIES

    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(40):
        out = model(**batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]

    after = retrieval_accuracy(model, [batch])
    assert after["volume_to_text"] >= 0.5 > after["chance"]
    assert after["text_to_volume"] >= 0.5
    assert after["slices_to_text"] > after["chance"]
    # the pairing matters: the same reports, mismatched, cost more than the true pairs
    with torch.no_grad():
        true = model(**batch)["loss_volume"].item()
        emb = model.embed(batch)
        shifted = contrastive_loss(emb["volume"], emb["text"].roll(1, dims=0), model.logit_scale).item()
    assert shifted > true + 1.0
