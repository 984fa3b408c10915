"""A damaged checkpoint folder is one clear error line naming the file, never a library
traceback, a silent partial load, or an unpickled payload; external .bin weights load only
through an explicit path (weights_only) or `convert_to_safetensors`."""

from __future__ import annotations

import json
import os
import re
import pickle
import shutil
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import medvlm3d
from medvlm3d.config import load_config
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.model import checkpoint as ckpt
from medvlm3d.model.convert import convert_to_safetensors
from medvlm3d.model.encoder3d import read_state_dict
from medvlm3d.model.medvlm import build_model


class _Payload:
    """Unpickling this creates the folder `path`: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}"]))
    return ckpt.save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "good")


@pytest.fixture()
def copy(saved: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ck"
    shutil.copytree(saved, dst)
    return dst


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _pickle_over(p: Path) -> None:
    p.write_bytes(pickle.dumps({"w": _Payload(p.parent / "pwned")}))


def _torch_zip_over(p: Path) -> None:
    torch.save({"w": torch.zeros(2)}, str(p))


def _edit_tensors(p: Path, fn: Callable[[dict], None]) -> None:
    state = load_file(str(p))
    fn(state)
    save_file(state, str(p))


def _reshape_first_two(state: dict) -> None:
    for k in sorted(k for k, v in state.items() if v.ndim == 2)[:2]:
        state[k] = torch.zeros(state[k].shape[0] + 1, state[k].shape[1])


def _drop_one(state: dict) -> None:
    state.pop(sorted(state)[0])


def _add_one(state: dict) -> None:
    state["bogus.weight"] = torch.zeros(3)


def _meta(value: object, raw: str | None = None) -> Callable[[Path], None]:
    def edit(p: Path) -> None:
        if raw is not None:
            p.write_text(raw)
            return
        meta = json.loads(p.read_text())
        if value is _MISSING:
            meta.pop("format_version")
        else:
            meta["format_version"] = value
        p.write_text(json.dumps(meta))
    return edit


_MISSING = object()

# (id, file in the checkpoint, how to damage it, regex the message must match)
CASES = [
    ("truncated-model", "model.safetensors", _truncate, r"not a readable safetensors file"),
    ("truncated-llm", "llm/model.safetensors", _truncate, r"not a readable safetensors file"),
    ("truncated-adapter", "adapter/adapter_model.safetensors", _truncate, r"not a readable safetensors file"),
    ("llm-wrong-shapes", "llm/model.safetensors", lambda p: _edit_tensors(p, _reshape_first_two),
     r"llm: cannot load the LLM .*2 tensor\(s\) of the wrong shape: \S+ \(expected \[\d+, \d+\], found"),
    ("pickle-as-model", "model.safetensors", _pickle_over, r"it is a pickle.*never unpickles"),
    ("pickle-as-llm", "llm/model.safetensors", _pickle_over, r"it is a pickle.*never unpickles"),
    ("torch-zip-as-model", "model.safetensors", _torch_zip_over, r"zip archive.*never unpickles"),
    ("wrong-shapes", "model.safetensors", lambda p: _edit_tensors(p, _reshape_first_two),
     r"2 tensor\(s\) of the wrong shape: \S+ \(expected \[\d+, \d+\], found \[\d+, \d+\]\)"),
    ("missing-tensor", "model.safetensors", lambda p: _edit_tensors(p, _drop_one), r"1 missing: \['"),
    ("unexpected-tensor", "model.safetensors", lambda p: _edit_tensors(p, _add_one),
     r"1 unexpected: \['bogus.weight'\]"),
    ("llm-missing-tensor", "llm/model.safetensors", lambda p: _edit_tensors(p, _drop_one), r"1 missing \['"),
    ("meta-not-json", "checkpoint.json", _meta(None, raw="{format_version: 1,"), r"not valid JSON"),
    ("meta-not-object", "checkpoint.json", _meta(None, raw="[1]"), r"JSON list; expected an object"),
    ("version-string", "checkpoint.json", _meta("1"), r"format_version '1' is a str; expected an integer"),
    ("version-float", "checkpoint.json", _meta(1.0), r"format_version 1.0 is a float; expected an integer"),
    ("version-missing", "checkpoint.json", _meta(_MISSING), r"no 'format_version'"),
    ("version-newer", "checkpoint.json", _meta(99), r"format 99 is newer"),
    ("pytorch-bin-in-llm", "llm/pytorch_model.bin", _torch_zip_over, r"pickle-based weight file.*convert"),
    ("adapter-bin", "adapter/adapter_model.bin", _torch_zip_over, r"pickle-based weight file.*convert"),
    ("pt-at-root", "extra.pt", _torch_zip_over, r"pickle-based weight file.*convert"),
]


@pytest.mark.parametrize("rel,damage,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_checkpoint_is_one_clear_line(copy: Path, rel: str, damage, match: str) -> None:
    target = copy / rel
    target.parent.mkdir(exist_ok=True)
    damage(target)
    with pytest.raises(DataError) as info:
        medvlm3d.load_pretrained(copy)
    msg = str(info.value)
    assert "\n" not in msg and (str(target) in msg or str(target.parent) in msg), msg
    assert re.search(match, msg), msg
    assert not (target.parent / "pwned").exists()


def test_config_yaml_with_an_unknown_key_names_the_file(copy: Path) -> None:
    cfg = copy / "config.yaml"
    cfg.write_text(cfg.read_text() + "bogus_section: 1\n")
    with pytest.raises(ConfigError, match=rf"^{str(cfg)}: .*bogus_section"):
        medvlm3d.load_pretrained(copy)
    cfg.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"{str(cfg)} is not valid YAML") as info:
        medvlm3d.load_pretrained(copy)
    assert "\n" not in str(info.value)


def test_init_from_a_damaged_checkpoint_is_also_clear(copy: Path, tiny_cfg) -> None:
    (copy / "llm" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(DataError, match=r"pytorch_model\.bin: a pickle-based weight file"):
        ckpt.init_from_checkpoint(tiny_cfg(), copy)
    (copy / "llm" / "pytorch_model.bin").unlink()
    _truncate(copy / "model.safetensors")
    with pytest.raises(DataError, match="model.safetensors: not a readable safetensors file"):
        ckpt.init_from_checkpoint(tiny_cfg(), copy)


@pytest.mark.parametrize("rel", ["tokenizer/tokenizer.json", "llm/config.json", "checkpoint.json"])
def test_a_fifo_in_the_checkpoint_is_refused_not_waited_on(copy: Path, rel: str) -> None:
    target = copy / rel
    target.unlink()
    os.mkfifo(target)
    box: list[BaseException] = []

    def load() -> None:
        try:
            medvlm3d.load_pretrained(copy)
        except BaseException as e:  # noqa: BLE001 - checked below
            box.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(30)  # a hard limit: opening the FIFO would block forever
    assert not t.is_alive(), "load_pretrained hangs on a FIFO"
    assert box and isinstance(box[0], DataError) and re.search(rf"{re.escape(str(target))}: is a FIFO", str(box[0]))


def test_the_intact_copy_still_loads(copy: Path) -> None:
    model = medvlm3d.load_pretrained(copy)
    assert model.num_visual_tokens > 0


# ------------------------------------------------------------------- external .bin weights


def test_convert_to_safetensors_round_trips_a_torch_bin(tmp_path: Path) -> None:
    sd = {"net.a.weight": torch.randn(3, 4), "net.b": torch.arange(5)}
    sd["net.tied"] = sd["net.a.weight"]  # shared storage: safetensors needs separate copies
    src = tmp_path / "pytorch_model.bin"
    torch.save({"state_dict": sd}, str(src))
    out = convert_to_safetensors(src, tmp_path / "out" / "enc.safetensors")
    back = load_file(str(out))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    with pytest.raises(DataError, match=r"must end in \.safetensors"):
        convert_to_safetensors(src, tmp_path / "x.bin")


@pytest.mark.parametrize("name", ["pytorch_model.bin", "evil.pt"])
def test_malicious_external_bin_is_one_line_and_never_runs(tmp_path: Path, name: str) -> None:
    src = tmp_path / name
    src.write_bytes(pickle.dumps({"w": _Payload(tmp_path / "pwned")}))
    for call in (lambda: convert_to_safetensors(src, tmp_path / "o.safetensors"),
                 lambda: read_state_dict(src, "3D encoder weights")):
        with pytest.raises(DataError) as info:
            call()
        assert "\n" not in str(info.value) and str(src) in str(info.value) and "weights_only=True" in str(info.value)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "o.safetensors").exists()


def test_convert_verb_writes_safetensors_and_refuses_a_pickle_payload(tmp_path: Path, capsys) -> None:
    from medvlm3d.cli import main

    sd = {"w": torch.randn(2, 3)}
    torch.save(sd, str(tmp_path / "weights.pt"))
    assert main(["convert", str(tmp_path / "weights.pt"), str(tmp_path / "w.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["w"], sd["w"])
    assert "w.safetensors" in capsys.readouterr().out
    evil = tmp_path / "pytorch_model.bin"
    evil.write_bytes(pickle.dumps({"w": _Payload(tmp_path / "pwned")}))
    assert main(["convert", str(evil), str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(evil) in err and err.count("\n") == 1
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "e.safetensors").exists()
    assert main(["convert", str(tmp_path / "missing.bin"), str(tmp_path / "m.safetensors")]) == 2
