"""save_pretrained / load_pretrained: identical logits and text, self-contained, atomic, no pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from medvlm3d.data.errors import DataError
import torch

import medvlm3d
from medvlm3d.data.collate import Collator
from medvlm3d.data.dataset import StudyDataset
from medvlm3d.model import checkpoint as ckpt
from medvlm3d.model.medvlm import MedVLM


def _batch(model: MedVLM, records: list[dict]) -> dict:
    ds = StudyDataset(records[:2], model.cfg.data, model.tokenizer, model.num_visual_tokens)
    return Collator(model.tokenizer.pad_token_id)([ds[0], ds[1]])


def _assert_same_answers(a: MedVLM, b: MedVLM, records: list[dict], exact: bool = True) -> None:
    """Same logits (bit for bit, or to 1e-5) and TG-IS scores on a batch, and the same generated text."""
    batch = _batch(a, records)
    with torch.no_grad():
        out_a, out_b = a(**batch), b(**batch)
    if exact:
        assert torch.equal(out_a.logits, out_b.logits)
    else:
        torch.testing.assert_close(out_a.logits, out_b.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out_a.scores, out_b.scores)
    rec = records[0]
    g1 = a.generate(volume=rec["image"], prompt=rec["question"], max_new_tokens=8)
    g2 = b.generate(volume=rec["image"], prompt=rec["question"], max_new_tokens=8)
    assert g1.text == g2.text
    torch.testing.assert_close(g1.scores, g2.scores)
    assert g1.scores.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("merge", [False, True], ids=["adapter", "merged"])
def test_round_trip_gives_identical_logits_and_text(trained: MedVLM, phantom_records, tmp_path: Path, merge: bool) -> None:
    out_dir = trained.save_pretrained(tmp_path / "ckpt", merge_lora=merge) or tmp_path / "ckpt"
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert {"config.yaml", "model.safetensors", "tokenizer", "llm", "checkpoint.json"} <= set(names)
    assert ("adapter" in names) != merge
    loaded = medvlm3d.load_pretrained(tmp_path / "ckpt")
    _assert_same_answers(trained, loaded, phantom_records, exact=not merge)


def test_merged_llm_loads_with_plain_transformers(trained: MedVLM, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    ckpt.save_pretrained(trained, tmp_path / "m", merge_lora=True)
    llm = AutoModelForCausalLM.from_pretrained(tmp_path / "m" / "llm", local_files_only=True)
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        ref = trained.llm(input_ids=ids).logits
    torch.testing.assert_close(llm(input_ids=ids).logits, ref, atol=1e-5, rtol=1e-5)
    meta = json.loads((tmp_path / "m" / "checkpoint.json").read_text())
    assert meta["llm_layout"] == "merged" and meta["num_visual_tokens"] == trained.num_visual_tokens


def test_failed_save_leaves_the_previous_checkpoint_whole(trained: MedVLM, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "ckpt"
    ckpt.save_pretrained(trained, target)
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_pretrained(trained, target)
    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(_Exploit.marker),))


def test_crafted_pickle_is_refused_and_never_runs(trained: MedVLM, tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    ckpt.save_pretrained(trained, target)
    _Exploit.marker = str(tmp_path / "pwned")
    (target / "model.safetensors").write_bytes(pickle.dumps({"w": _Exploit()}))
    with pytest.raises(Exception):
        medvlm3d.load_pretrained(target)
    assert not (tmp_path / "pwned").exists()


def test_missing_or_foreign_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a medvlm3d checkpoint"):
        medvlm3d.load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="save_base_llm"):
        ckpt.save_pretrained(object(), tmp_path / "x", save_base_llm="sometimes")


def test_init_from_checkpoint_keeps_weights_and_adds_fresh_lora(trained: MedVLM, tmp_path: Path, tiny_cfg) -> None:
    ckpt.save_pretrained(trained, tmp_path / "stage", merge_lora=True)
    nxt = ckpt.init_from_checkpoint(tiny_cfg("model.trainable.encoder3d=frozen"), tmp_path / "stage")
    torch.testing.assert_close(nxt.encoder3d.state_dict(), trained.encoder3d.state_dict())
    assert any("lora_A" in n for n, _ in nxt.llm.named_parameters())
    assert not any(p.requires_grad for p in nxt.encoder3d.parameters())


@pytest.mark.parametrize("device_map", ["auto", {"": "cpu"}], ids=["auto", "dict"])
def test_device_map_load_gives_identical_logits_and_text(trained: MedVLM, phantom_records, tmp_path: Path, device_map) -> None:
    ckpt.save_pretrained(trained, tmp_path / "ckpt")
    plain = medvlm3d.load_pretrained(tmp_path / "ckpt")
    mapped = medvlm3d.load_pretrained(tmp_path / "ckpt", device_map=device_map)
    assert any("lora_A" in n for n, _ in mapped.llm.named_parameters())  # the adapter is loaded on top
    assert mapped.device == mapped.embed_device == mapped.llm.get_input_embeddings().weight.device
    assert {p.device for n, p in mapped.named_parameters() if not n.startswith("llm.")} == {mapped.embed_device}
    _assert_same_answers(plain, mapped, phantom_records)


_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("atuo", "device_map must be one of .*'auto'.*got 'atuo'"),
        ([0, 1], "device_map must be one of .*got \\[0, 1\\]"),
        ({}, "got an empty dict"),
        pytest.param("cuda:0", "names a CUDA device but torch sees no CUDA GPU", marks=_NO_CUDA),
    ],
    ids=["typo", "list", "empty", "no-cuda"],
)
def test_bad_device_map_is_a_clear_error(trained: MedVLM, tmp_path: Path, bad, message: str) -> None:
    ckpt.save_pretrained(trained, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=message):
        medvlm3d.load_pretrained(tmp_path / "ckpt", device_map=bad)


def test_device_map_needs_llm_weights(tiny_cfg) -> None:
    from medvlm3d.model.llm import build_llm, load_tokenizer

    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="needs an LLM loaded from a folder"):
        build_llm(cfg.model.llm, load_tokenizer(cfg.model.llm), device_map="auto")


def test_device_map_with_accelerate_hooks(trained: MedVLM, phantom_records, tmp_path: Path, monkeypatch) -> None:
    """A map that offloads layers (to the disk: the only second 'device' a CPU machine has) puts
    accelerate's hooks on the LLM, as a multi-GPU map does: a merged checkpoint gives the same
    logits; an adapter on an offloaded LLM is a clear error that says to merge it first."""
    from medvlm3d.model import llm as llm_mod

    original = llm_mod.AutoModelForCausalLM.from_pretrained

    def with_offload_folder(*args, **kwargs):
        return original(*args, offload_folder=str(tmp_path / "offload"), **kwargs)

    monkeypatch.setattr(llm_mod.AutoModelForCausalLM, "from_pretrained", with_offload_folder)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    ckpt.save_pretrained(trained, tmp_path / "merged", merge_lora=True)
    plain = medvlm3d.load_pretrained(tmp_path / "merged")
    mapped = medvlm3d.load_pretrained(tmp_path / "merged", device_map=device_map)
    assert hasattr(mapped.llm.model.layers[0], "_hf_hook") and mapped.llm.hf_device_map == device_map
    _assert_same_answers(plain, mapped, phantom_records)

    ckpt.save_pretrained(trained, tmp_path / "adapter")
    with pytest.raises(ValueError, match="offloads part of the LLM to cpu and disk.*merge-lora"):
        medvlm3d.load_pretrained(tmp_path / "adapter", device_map=device_map)


def test_reduced_precision_on_the_cpu_is_refused_clearly(tmp_path) -> None:
    import torch

    from medvlm3d.model.checkpoint import load_pretrained

    with pytest.raises(ValueError, match="float32"):
        load_pretrained(tmp_path, dtype=torch.bfloat16)
