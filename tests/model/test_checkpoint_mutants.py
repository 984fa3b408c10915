"""Checkpoint behaviours that mutation testing (bench/mutation.sh) found unpinned.

init_from_checkpoint for every (adapter | merged) x (lora | full) pair, its fresh / skipped log
lines and a config that names encoder weights; the external-LLM layout (no llm/ folder);
device-map checks and the placement of the non-LLM modules; the offload refusal for each kind
of map; the text of the errors users read.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import medvlm3d
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.model import checkpoint as ckpt
from medvlm3d.model.medvlm import MedVLM, build_model

_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(scope="module")
def saved(trained: MedVLM, tmp_path_factory) -> dict[str, Path]:
    """`trained` saved twice: with its LoRA adapter, and merged."""
    root = tmp_path_factory.mktemp("saved")
    return {"adapter": ckpt.save_pretrained(trained, root / "adapter"),
            "merged": ckpt.save_pretrained(trained, root / "merged", merge_lora=True)}


def _ids() -> torch.Tensor:
    return torch.tensor([[1, 5, 6, 7, 9]])


def _llm_logits(llm: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return llm(input_ids=_ids()).logits


def _lora_state(llm: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in llm.state_dict().items() if "lora_" in k}


# --------------------------------------------------------------------------------------------
# small pieces


def test_atomic_dir_swap_replaces_the_folder(tmp_path: Path) -> None:
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a").write_text("new")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "b").write_text("old")
    ckpt.atomic_dir_swap(tmp_path / "new", tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert [p.name for p in (tmp_path / "final").iterdir()] == ["a"]


def test_device_map_messages() -> None:
    with pytest.raises(ConfigError, match=r"a dict \{module name: device\}; got True$"):
        ckpt.check_device_map(True)  # a bool is no device, even though it is an int
    with pytest.raises(ConfigError, match=r"got \{'a': True\} \(True is not a device\)$"):
        ckpt.check_device_map({"a": True})
    assert ckpt.check_device_map({"a": "cpu", "b": "disk"}) == {"a": "cpu", "b": "disk"}


@_NO_CUDA
@pytest.mark.parametrize("device_map", [0, {"": 0}, {"a": "cpu", "b": 1}], ids=["int", "dict-int", "mixed"])
def test_gpu_index_without_cuda_is_named(device_map) -> None:
    with pytest.raises(ConfigError, match="names a CUDA device but torch sees no CUDA GPU"):
        ckpt.check_device_map(device_map)


class _Fake(nn.Module):
    """What _place_around_llm reads of a MedVLM: `llm` (first), other children, embed_device."""

    def __init__(self, dev: str) -> None:
        super().__init__()
        self.llm = nn.Linear(2, 2)
        self.enc = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)
        self.embed_device = torch.device(dev)


def test_place_around_llm_moves_and_casts_all_but_the_llm() -> None:
    m = _Fake("meta")  # a device that is not the CPU, on any machine
    assert ckpt._place_around_llm(m, torch.float16) == torch.device("meta")
    for child in (m.enc, m.head):
        assert child.weight.device.type == "meta" and child.weight.dtype == torch.float16
    assert m.llm.weight.device.type == "cpu" and m.llm.weight.dtype == torch.float32
    cpu = _Fake("cpu")
    assert ckpt._place_around_llm(cpu, torch.float16) == torch.device("cpu")
    assert cpu.enc.weight.dtype == torch.float32  # no reduced precision on the CPU
    plain = _Fake("meta")
    ckpt._place_around_llm(plain, None)
    assert plain.enc.weight.device.type == "meta" and plain.enc.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", ["parameter", "buffer"])
def test_place_around_llm_refuses_tensors_outside_submodules(kind: str) -> None:
    m = _Fake("cpu")
    if kind == "parameter":
        m.stray = nn.Parameter(torch.zeros(1))
    else:
        m.register_buffer("stray", torch.zeros(1))
    msg = "MedVLM holds tensors outside its submodules; load_pretrained(device_map=...) cannot place them"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        ckpt._place_around_llm(m, None)


# --------------------------------------------------------------------------------------------
# init_from_checkpoint


def test_init_from_a_folder_without_weights_names_the_key(tmp_path: Path, tiny_cfg) -> None:
    with pytest.raises(ConfigError, match=rf"^train\.init_from={re.escape(repr(str(tmp_path)))} is not a medvlm3d "
                       r"checkpoint \(no model\.safetensors\)$"):
        ckpt.init_from_checkpoint(tiny_cfg(), tmp_path)


def test_init_from_adapter_keeps_that_adapter_trainable(trained: MedVLM, saved, tiny_cfg) -> None:
    cfg = tiny_cfg("model.trainable.llm=lora")
    tokenizer_before = cfg.model.llm.tokenizer
    nxt = ckpt.init_from_checkpoint(cfg, saved["adapter"])
    assert cfg.model.llm.tokenizer == tokenizer_before, "the caller's config was changed"
    assert nxt.cfg.model.llm.path == ""
    ours, theirs = _lora_state(nxt.llm), _lora_state(trained.llm)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert nxt.llm.peft_config["default"].inference_mode is False
    assert any(p.requires_grad for n, p in nxt.llm.named_parameters() if "lora_" in n)


def test_init_from_adapter_with_full_policy_merges_it(trained: MedVLM, saved, tiny_cfg) -> None:
    nxt = ckpt.init_from_checkpoint(tiny_cfg("model.trainable.llm=full"), saved["adapter"])
    assert not any("lora_" in n for n, _ in nxt.llm.named_parameters())
    torch.testing.assert_close(_llm_logits(nxt.llm), _llm_logits(trained.llm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", ["full", "lora"])
def test_init_from_merged_takes_its_llm(trained: MedVLM, saved, tiny_cfg, policy: str) -> None:
    nxt = ckpt.init_from_checkpoint(tiny_cfg(f"model.trainable.llm={policy}"), saved["merged"])
    assert any("lora_" in n for n, _ in nxt.llm.named_parameters()) == (policy == "lora")
    # the merged weights as they were (lora: a fresh adapter, B = 0, on top: the same function)
    torch.testing.assert_close(_llm_logits(nxt.llm), _llm_logits(trained.llm), atol=1e-5, rtol=1e-5)
    assert all(not v.any() for k, v in _lora_state(nxt.llm).items() if "lora_B" in k)


def test_init_from_ignores_encoder_weights_named_in_the_config(trained: MedVLM, saved, tiny_cfg, tmp_path: Path) -> None:
    """The checkpoint holds the encoder: a pretrained-weights file the stage config still names
    (perhaps gone since) is not read."""
    nxt = ckpt.init_from_checkpoint(tiny_cfg(f"model.encoder3d.weights={tmp_path / 'gone.safetensors'}"), saved["merged"])
    torch.testing.assert_close(nxt.encoder3d.state_dict(), trained.encoder3d.state_dict())


def _messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and r.name == ckpt.log.name]


def test_init_from_logs_fresh_and_skipped_tensors(saved, tiny_cfg, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=ckpt.log.name)
    root = saved["merged"]
    stored = set(load_file(str(root / "model.safetensors")))
    richer = ckpt.init_from_checkpoint(tiny_cfg("model.tgis.scorer=context", "model.tgis.pos_embed=true"), root)
    fresh = sorted(k for k in richer.state_dict() if k not in stored and not k.startswith("llm."))
    assert len(fresh) > 3 and all(k.startswith("tgis.") for k in fresh)
    assert _messages(caplog, logging.INFO) == [
        f"init_from {root}: {len(fresh)} tensors start fresh in this stage (e.g. {fresh[:3]})"]
    assert _messages(caplog, logging.WARNING) == []

    ckpt.save_pretrained(richer, tmp_path / "richer")
    caplog.clear()
    ckpt.init_from_checkpoint(tiny_cfg(), tmp_path / "richer")
    assert _messages(caplog, logging.WARNING) == [
        f"init_from {tmp_path / 'richer'}: {len(fresh)} tensors did not fit this config and were skipped "
        f"(e.g. {fresh[:3]})"]
    assert _messages(caplog, logging.INFO) == []


def test_init_from_leaves_the_text_encoder_out_of_the_fresh_list(saved, tiny_cfg, tiny_bert: Path, caplog) -> None:
    """A question encoder (tgis.text_source hf) comes from its own folder, not the checkpoint:
    it is not reported as starting fresh (its width changes TG-IS's text map, which is)."""
    caplog.set_level(logging.INFO, logger=ckpt.log.name)
    nxt = ckpt.init_from_checkpoint(tiny_cfg("model.tgis.text_source=hf", f"model.tgis.text_encoder={tiny_bert}"),
                                    saved["merged"])
    assert any(k.startswith("text_encoder.") for k in nxt.state_dict())
    root = saved["merged"]
    assert _messages(caplog, logging.INFO) == [
        f"init_from {root}: 1 tensors start fresh in this stage (e.g. ['tgis.text_proj.weight'])"]
    assert _messages(caplog, logging.WARNING) == [  # [width, 16] here, [width, width] in the checkpoint
        f"init_from {root}: 1 tensors did not fit this config and were skipped (e.g. ['tgis.text_proj.weight'])"]


# --------------------------------------------------------------------------------------------
# an LLM kept outside the checkpoint (frozen, from its own folder)


@pytest.fixture(scope="module")
def external(trained: MedVLM, saved, tiny_tokenizer_dir: Path, tmp_path_factory) -> tuple[MedVLM, Path]:
    from medvlm3d.config import load_config

    llm_dir = saved["merged"] / "llm"
    torch.manual_seed(1)
    model = build_model(load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}", f"model.llm.path={llm_dir}",
                                             "model.trainable.llm=frozen"])).eval()
    return model, ckpt.save_pretrained(model, tmp_path_factory.mktemp("ext") / "ckpt")


def test_external_llm_is_named_not_copied(external, saved) -> None:
    model, root = external
    assert not (root / "llm").exists() and not (root / "adapter").exists()
    meta = json.loads((root / "checkpoint.json").read_text())
    assert meta["llm_layout"] == "external" and meta["external_llm"] == str(saved["merged"] / "llm")
    loaded = medvlm3d.load_pretrained(root)
    assert loaded.cfg.model.llm.path == ""
    torch.testing.assert_close(_llm_logits(loaded.llm), _llm_logits(model.llm))
    torch.testing.assert_close(loaded.encoder3d.state_dict(), model.encoder3d.state_dict())


def test_init_from_an_external_checkpoint(external, tiny_cfg) -> None:
    model, root = external
    nxt = ckpt.init_from_checkpoint(tiny_cfg("model.trainable.llm=frozen"), root)
    torch.testing.assert_close(_llm_logits(nxt.llm), _llm_logits(model.llm))


@pytest.mark.parametrize("meta", ["empty-path", "no-checkpoint-json"])
def test_no_llm_anywhere_is_one_clear_error(external, tmp_path: Path, meta: str) -> None:
    _, root = external
    copy = tmp_path / "ck"
    shutil.copytree(root, copy)
    if meta == "empty-path":
        fields = json.loads((copy / "checkpoint.json").read_text())
        (copy / "checkpoint.json").write_text(json.dumps({**fields, "external_llm": ""}))
    else:  # folders from before checkpoint.json
        (copy / "checkpoint.json").unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(copy))}: no llm/ folder and no external LLM path in "
                       r"checkpoint\.json$"):
        medvlm3d.load_pretrained(copy)


def test_unloadable_adapter_is_one_clear_error(saved, tmp_path: Path) -> None:
    copy = tmp_path / "ck"
    shutil.copytree(saved["adapter"], copy)
    (copy / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(DataError, match=rf"^{re.escape(str(copy / 'adapter'))}: cannot load the LoRA adapter "
                       r"\(\w+: .+\); expected the PEFT folder written by save_pretrained \(adapter_config\.json, "
                       r"adapter_model\.safetensors\)$"):
        medvlm3d.load_pretrained(copy)


def test_unloadable_llm_message_names_the_library_error(saved, tmp_path: Path) -> None:
    copy = tmp_path / "ck"
    shutil.copytree(saved["merged"], copy)
    weights = copy / "llm" / "model.safetensors"
    state = load_file(str(weights))
    key = sorted(k for k, v in state.items() if v.ndim == 2)[0]
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(weights))
    with pytest.raises(DataError) as info:
        medvlm3d.load_pretrained(copy)
    assert re.search(r"cannot load the LLM \([A-Za-z]+Error: \S", str(info.value)), str(info.value)
    assert str(info.value).endswith("; expected the HF model folder written by save_pretrained (safetensors)")


# --------------------------------------------------------------------------------------------
# a LoRA adapter onto a dispatched LLM: refused exactly when part of it is offloaded


@pytest.mark.parametrize(
    ("placed", "refused"),
    [({"a": "cpu", "b": "cpu"}, None), ({"a": 0, "b": 0}, None), ({"a": "disk"}, "disk"),
     ({"a": 0, "b": "cpu"}, "cpu"), ({"a": 0, "b": "disk"}, "disk"), ({"a": "cpu", "b": "disk"}, "cpu and disk")],
    ids=["all-cpu", "one-gpu", "all-disk", "gpu+cpu", "gpu+disk", "cpu+disk"],
)
def test_adapter_on_a_dispatched_llm(saved, monkeypatch, placed: dict, refused: str | None) -> None:
    from medvlm3d.model import llm as llm_mod

    build = llm_mod.build_llm

    def with_map(*args, **kwargs):  # the map a dispatch over these devices leaves on the model
        llm = build(*args, **kwargs)
        llm.hf_device_map = placed
        return llm

    monkeypatch.setattr(llm_mod, "build_llm", with_map)
    if refused is None:
        model = medvlm3d.load_pretrained(saved["adapter"], device_map="auto")
        assert any("lora_" in n for n, _ in model.llm.named_parameters())
        return
    with pytest.raises(ValueError) as info:
        medvlm3d.load_pretrained(saved["adapter"], device_map="auto")
    msg = str(info.value)
    assert f"offloads part of the LLM to {refused} (" in msg
    assert msg.endswith("Merge it first (medvlm3d export --merge-lora) or give the LLM enough GPU memory (more GPUs)")


# --------------------------------------------------------------------------------------------
# load_pretrained: the folder check and the LLM dtype


def test_weights_missing_beside_a_config_is_not_a_checkpoint(saved, tmp_path: Path) -> None:
    copy = tmp_path / "ck"
    shutil.copytree(saved["merged"], copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(DataError, match="not a medvlm3d checkpoint: expected config.yaml and model.safetensors"):
        medvlm3d.load_pretrained(copy)


def test_reduced_precision_on_the_cpu_says_why(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        medvlm3d.load_pretrained(tmp_path, dtype=torch.float16)
    assert str(info.value).endswith("since some 3D ops (avg_pool3d) have no reduced-precision CPU kernel")


def test_llm_dtype_comes_from_the_argument_else_the_config(saved, tmp_path: Path) -> None:
    copy = tmp_path / "ck"
    shutil.copytree(saved["merged"], copy)
    text = (copy / "config.yaml").read_text()
    assert re.search(r"^    dtype: float32$", text, flags=re.M)
    (copy / "config.yaml").write_text(re.sub(r"^    dtype: float32$", "    dtype: bfloat16", text, flags=re.M))
    kept = medvlm3d.load_pretrained(copy)  # dtype=None: the config's
    assert kept.cfg.model.llm.dtype == "bfloat16" and kept.llm.get_input_embeddings().weight.dtype == torch.bfloat16
    asked = medvlm3d.load_pretrained(copy, dtype=torch.float32)
    assert asked.cfg.model.llm.dtype == "float32" and asked.llm.get_input_embeddings().weight.dtype == torch.float32
    # with a device map the CPU check does not apply: bf16 is passed on to the LLM's loader
    mapped = medvlm3d.load_pretrained(saved["merged"], dtype=torch.bfloat16, device_map="auto")
    assert mapped.cfg.model.llm.dtype == "bfloat16" and mapped.llm.get_input_embeddings().weight.dtype == torch.bfloat16
