"""The paper configs (issue 18): docs/baselines.md holds their hyper-parameters, and this file
holds docs/baselines.md.

- every backticked cell of the doc's tables equals the loaded config (a silent change fails);
- a paper config's stages cannot be overridden by a generic stage overlay;
- each config builds at real size on the meta device (no weights) with the visual-token count and
  parameter counts of its architecture: each component within 0.1% of the count from its
  formula below (the LLM exactly);
- each config trains one step at tiny size (the same config with TINY overrides; slow).
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from medvlm3d.train.config import TrainConfig, schedule_steps

from medvlm3d.config import ConfigError, config_dir, load_config, to_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "baselines.md"
PAPER_CONFIGS = ("med2e3", "m3d_lamed", "ms_vlm", "med2e3_votemi_distill", "brainmd_votemi")
SECTIONS = ("data", "model", "train", "eval")


# --------------------------------------------------------------------------------------------
# the table


def doc_cells() -> list[tuple[str, str, str, str]]:
    """(config, key, stage, value text) for each backticked cell under a backticked key column."""
    cells = []
    header: list[str] = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = []
            continue
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if parts[0] == "config":
            header = parts
            continue
        row = re.fullmatch(r"`([a-z0-9_]+)`", parts[0])
        if not header or row is None:
            continue
        for col, cell in zip(header[1:], parts[1:]):
            key, value = re.fullmatch(r"`([^`]+)`", col), re.match(r"`([^`]*)`", cell)
            if key and value:
                name, _, stage = key.group(1).partition("@")
                cells.append((row.group(1), name, stage, value.group(1)))
    return cells


@cache
def loaded(name: str, stage: str) -> dict[str, Any]:
    return to_dict(load_config(name, layers=[stage] if stage else []))


def lookup(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg if key.split(".")[0] in SECTIONS else cfg["model"]
    for part in key.split("."):
        node = node[part]
    return node


def same(value: Any, text: str) -> bool:
    if isinstance(value, str):
        return value == text  # as written ("off" is not YAML's False here)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        want = yaml.safe_load(text)
        return (list(value) if isinstance(value, (list, tuple)) else value) == want
    return math.isclose(float(value), float(text), rel_tol=1e-9, abs_tol=0.0)


def test_the_table_covers_every_paper_config_and_hyper_parameter():
    cells = doc_cells()
    assert {c for c, *_ in cells} == set(PAPER_CONFIGS)
    per_config = {c: sum(1 for x in cells if x[0] == c) for c in PAPER_CONFIGS}
    assert min(per_config.values()) >= 50, per_config  # 24 model/data + 26 training columns each


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_every_cell_of_the_table_is_the_config(name: str):
    wrong = [(key, stage, text, lookup(loaded(name, stage), key))
             for config, key, stage, text in doc_cells() if config == name
             if not same(lookup(loaded(name, stage), key), text)]
    assert not wrong, f"docs/baselines.md disagrees with configs/{name}.yaml: {wrong}"


def test_med2e3_is_the_released_recipe():
    """The values issue 18 lists, independently of the doc."""
    s1, s2 = load_config("med2e3", layers=["stage1_align"]), load_config("med2e3", layers=["stage2_finetune"])
    assert (s1.train.lr, s1.train.epochs, s1.train.global_batch) == (1e-4, 3, 64)
    assert (s2.train.lr, s2.train.epochs, s2.train.global_batch) == (5e-5, 4, 128)
    assert (s2.model.trainable.llm, s2.model.trainable.slice_encoder, s2.model.trainable.encoder3d) == ("full", "full", "frozen")
    assert s1.model.trainable.slice_encoder == "frozen" and s1.model.trainable.llm == "frozen"
    t = s2.model.tgis
    assert (t.tau, t.score_dropout, t.text_source, t.text_pooling, t.scorer) == (5.0, 0.1, "hf", "pooler", "med2e3")
    assert s2.train.distill_weight == 0 and s2.train.slice_loss_weight == 0 and s2.model.vote_mi.teacher == "off"
    assert s2.data.max_text_len == 768 and s2.model.slice_encoder.normalize == "none"


# --------------------------------------------------------------------------------------------
# stages held by the paper config


def test_a_shipped_stage_overlay_selects_the_papers_block_not_its_own_values():
    assert load_config("med2e3", layers=["stage1_align"]).train.lr == 1e-4  # stage1_align.yaml says 1e-3
    assert load_config("demo", layers=["stage1_align"]).train.lr == 1e-3  # configs without stages: as before
    assert load_config("med2e3", ["train.stage=stage1_align"]).train.epochs == 3
    # the shipped overlay named by its path selects too
    assert load_config("med2e3", layers=[str(config_dir() / "stage1_align.yaml")]).train.lr == 1e-4
    assert load_config("med2e3", ["train.lr=3e-5"], layers=["stage2_finetune"]).train.lr == 3e-5  # explicit wins


def test_a_layer_that_changes_a_paper_stage_value_is_refused(tmp_path: Path):
    layer = tmp_path / "mine.yaml"
    layer.write_text("train: {lr: 1.0e-3, max_steps: 200}\n")
    with pytest.raises(ConfigError, match=r"declares its own stage hyper-parameters.*train\.lr"):
        load_config("med2e3", layers=[str(layer)])
    layer.write_text("train: {output_dir: runs/elsewhere}\n")  # not a stage key: merged
    assert load_config("med2e3", layers=[str(layer)]).train.output_dir == "runs/elsewhere"
    with pytest.raises(ConfigError, match="stage0_clip"):
        load_config("med2e3", layers=["stage0_clip"])


def test_schedule_steps_turns_epochs_and_global_batch_into_steps():
    t = TrainConfig(batch_size=32, global_batch=128, epochs=4, warmup_ratio=0.03, max_steps=7)
    assert schedule_steps(t, 1000, 2) == (2, 32, 1)  # accum 128/(32*2); ceil(4*1000/128); ceil(0.03*32)
    assert schedule_steps(TrainConfig(max_steps=7, warmup_steps=3), 1000, 2) == (1, 7, 3)  # all off
    with pytest.raises(ConfigError, match="global_batch"):
        schedule_steps(TrainConfig(batch_size=32, global_batch=64), 10, 3)


# --------------------------------------------------------------------------------------------
# real size on the meta device


def vit_params(h: int, m: int, layers: int, patch_in: int, positions: int, qkv_bias: bool, extra: int = 0) -> int:
    """Pre-norm ViT: per block 2 LayerNorms, qkv (h -> 3h), proj, MLP h -> m -> h; patch conv, positions, final norm."""
    block = 4 * h * h + 2 * h * m + (3 * h if qkv_bias else 0) + h + 4 * h + m + h
    return layers * block + (patch_in * h + h) + positions * h + 2 * h + extra


def mlp2(i: int, w: int) -> int:
    return i * w + w + w * w + w


PHI3_BODY = 32 * (3 * 3072 * 3072 + 3072 * 3072 + 3072 * 2 * 8192 + 8192 * 3072 + 2 * 3072) + 3072  # 3.624 B
PHI3_LORA16 = 32 * 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))  # 25.17 M
M3D_VIT = vit_params(768, 3072, 12, 4 * 16 * 16, 2048, qkv_bias=False)  # 87.39 M
SIGLIP_L = vit_params(1024, 4096, 24, 3 * 16 * 16, 256, qkv_bias=True)  # 303.36 M
VIT_B = vit_params(768, 3072, 12, 3 * 16 * 16, 197, qkv_bias=True, extra=768)  # 85.80 M (+ class token)
W = 3072
REAL = {  # config: (visual tokens, {component: parameters without the LLM's V-dependent embeddings})
    "med2e3": (512, {"encoder3d": M3D_VIT, "slice_encoder": SIGLIP_L, "tgis": W * W + W,
                     "projector": mlp2(768, W) + mlp2(1024, W), "llm": PHI3_BODY}),
    "m3d_lamed": (256, {"encoder3d": M3D_VIT, "projector": mlp2(768, W), "llm": PHI3_BODY + PHI3_LORA16}),
    "ms_vlm": (272, {"encoder3d": M3D_VIT, "slice_encoder": VIT_B, "tgis": W * W + W,
                     "projector": mlp2(768, W) + mlp2(768, W), "llm": PHI3_BODY + PHI3_LORA16}),
    "med2e3_votemi_distill": (512, {"encoder3d": M3D_VIT, "slice_encoder": SIGLIP_L,
                                    "projector": mlp2(768, W) + mlp2(1024, W), "llm": PHI3_BODY}),
    "brainmd_votemi": (384, {"slice_encoder": SIGLIP_L, "projector": mlp2(1024, W), "llm": PHI3_BODY + PHI3_LORA16}),
}


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_builds_at_real_size_on_the_meta_device(name: str, tiny_tokenizer_dir: Path):
    from medvlm3d.model.medvlm import build_model

    # the BERT text tower loads from a folder: the meta build takes the question feature from the LLM
    cfg = load_config(name, [f"model.llm.tokenizer={tiny_tokenizer_dir}", "model.tgis.text_source=llm"])
    with torch.device("meta"):
        model = build_model(cfg)
    tokens, expected = REAL[name]
    assert model.num_visual_tokens == tokens
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in model.components().items() if m is not None}
    counts["llm"] -= 2 * len(model.tokenizer) * W  # input embeddings and LM head: V x 3072 each
    assert counts["llm"] == expected["llm"], (counts["llm"], expected["llm"])
    for part, n in expected.items():
        assert math.isclose(counts[part], n, rel_tol=1e-3), (part, counts[part], n)
    assert set(counts) - set(expected) <= {"inter_slice", "tgis"}  # ms_vlm's inter-slice; distill's context head


# --------------------------------------------------------------------------------------------
# one training step at tiny size

TINY = [
    "data.size=[16,32,32]", "data.slice_size=[32,32]", "data.num_workers=0", "data.max_text_len=96",
    "model.encoder3d.preset=vit3d_tiny", "model.encoder3d.hidden_size=32", "model.encoder3d.num_layers=1",
    "model.encoder3d.num_heads=2", "model.encoder3d.mlp_dim=64",
    "model.slice_encoder.model_name=vit_tiny_patch16_224", "model.slice_encoder.num_tokens=4",
    "model.slice_encoder.model_kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.slice_encoder.gradient_checkpointing=false", "model.inter_slice.num_heads=2",
    "model.projector.pool3d=[1,2,2]",
    "model.llm.hidden_size=32", "model.llm.num_layers=2", "model.llm.num_heads=4", "model.llm.num_kv_heads=4",
    "model.llm.intermediate_size=64", "model.llm.max_position_embeddings=512", "model.llm.dtype=float32",
    "model.llm.gradient_checkpointing=false", "model.llm.lora.r=4", "model.llm.lora.alpha=8",
    "train.mixed_precision='no'", "train.batch_size=2", "train.global_batch=0", "train.grad_accum=1",
    "train.epochs=0", "train.max_steps=1", "train.log_every=1",
]


@pytest.mark.slow
@pytest.mark.parametrize("name,stage", [("med2e3", "stage2_finetune"), ("m3d_lamed", "stage2_finetune"),
                                        ("ms_vlm", "stage2_finetune"), ("med2e3_votemi_distill", "stage1_align"),
                                        ("brainmd_votemi", "stage2_finetune")])
def test_one_training_step_at_tiny_size(name: str, stage: str, tmp_path: Path, phantom_manifest: Path,
                                        tiny_tokenizer_dir: Path, tiny_bert: Path):
    from accelerate.state import AcceleratorState, GradientState
    from medvlm3d.train.checkpointing import latest_complete, read_progress
    from medvlm3d.train.recipe import run_training

    # med2e3 also runs the epoch path: global batch 4 = 2 x accumulation 2, 0.01 epoch -> 1 step
    epochs = ["train.global_batch=4", "train.epochs=0.01"] if name == "med2e3" else []
    cfg = load_config(name, [*TINY, f"model.llm.tokenizer={tiny_tokenizer_dir}", f"model.tgis.text_encoder={tiny_bert}",
                             f"data.train={phantom_manifest}", f"train.output_dir={tmp_path / 'run'}", *epochs],
                      layers=[stage])
    assert cfg.model.llm.arch == "phi3" and cfg.train.stage == stage
    try:
        run_training(cfg)
    finally:  # Accelerate keeps process-wide singletons
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    losses = read_progress(latest_complete(tmp_path / "run"))["loss_history"]
    if epochs:
        saved = load_config(str(tmp_path / "run" / "config.yaml"))
        assert (saved.train.grad_accum, saved.train.max_steps) == (2, 1)
    assert len(losses) == 1 and losses[0] is not None and math.isfinite(losses[0]) and losses[0] > 0


# --------------------------------------------------------------------------------------------
# the fields the paper configs added (default off elsewhere)


def test_score_dropout_drops_the_fused_scores_in_training_only():
    from medvlm3d.model.tgis import TGIS, TGISConfig

    torch.manual_seed(0)
    head = TGIS(TGISConfig(score_dropout=0.5), dim=8, text_dim=8)
    x3d, v, text = torch.randn(1, 4, 8), torch.randn(1, 4, 3, 8), torch.randn(1, 8)
    args = (x3d, (4, 1, 1), v, text, torch.rand(1, 4), torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    head.eval()
    clean = head(*args)
    assert torch.allclose(clean.z2d, torch.einsum("bs,bstd->btd", clean.scores, v), atol=1e-6)
    head.train()
    dropped = head(*args)
    assert torch.allclose(dropped.scores, clean.scores)  # the scores the losses read stay whole
    assert not torch.allclose(dropped.z2d, clean.z2d)


def test_normalize_none_feeds_the_slices_as_they_are():
    from medvlm3d.model.slice_encoder import SliceEncoder, SliceEncoderConfig

    kw: dict[str, Any] = {"model_name": "vit_tiny_patch16_224", "in_chans": 3, "num_tokens": 4,
                          "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}}
    plain = SliceEncoder(SliceEncoderConfig(normalize="none", **kw), (32, 32))
    assert torch.equal(plain.mean, torch.zeros(1, 3, 1, 1)) and torch.equal(plain.std, torch.ones(1, 3, 1, 1))
    assert not torch.equal(SliceEncoder(SliceEncoderConfig(**kw), (32, 32)).mean, plain.mean)


def test_text_pooling_pooler_is_the_encoders_pooler_output(tiny_bert: Path):
    from medvlm3d.model.llm import TextEncoder

    enc = TextEncoder(str(tiny_bert), out_pooling="pooler")
    batch = enc.tokenizer(["a liver lesion"], return_tensors="pt")
    with torch.no_grad():
        want = enc.encoder(**batch).pooler_output
    assert torch.allclose(enc(["a liver lesion"]), want)
    assert not torch.allclose(TextEncoder(str(tiny_bert), out_pooling="cls")(["a liver lesion"]), want)
