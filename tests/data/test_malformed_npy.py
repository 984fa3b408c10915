"""Malformed .npy volumes (issue 6), in process: wrong rank, channels or dtype, values outside
[0, 1], NaN/Inf, pickled payloads, npz archives, truncation, hand-written headers; and a check
that pickle payloads (in .npy, raw, or behind a manifest) never run.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from medvlm3d import DataError
from medvlm3d.config import DataConfig
from medvlm3d.data.validate import validate_dataset
from medvlm3d.data.volume import load_study, load_volume

from malformed_cases import GOOD, GOOD_NPY, Expect, Marker, check_volume_case, cut, npy_raw, touch
from malformed_cases import deadline  # noqa: F401  (autouse: the per-case time limit)

VOLUME: dict[str, Callable[[Path], Expect]] = {}


def _npy(name: str, arr: Any, match: str) -> Callable[[Path], Expect]:
    def build(d: Path) -> Expect:
        np.save(d / name, arr, allow_pickle=True)
        return Expect(d / name, [name], match)
    return build

VOLUME.update({
    "npy-rank2": _npy("r2.npy", GOOD_NPY[0, 0], r"expected \[1, D, H, W\]"),
    "npy-rank5": _npy("r5.npy", GOOD_NPY[None], r"expected \[1, D, H, W\]"),
    "npy-3-channels": _npy("ch.npy", np.repeat(GOOD_NPY, 3, 0), "channels"),
    "npy-complex": _npy("cx.npy", GOOD_NPY.astype(np.complex64), "dtype"),
    "npy-strings": _npy("s.npy", np.full((4, 4, 4), "a"), "dtype"),
    "npy-bool": _npy("b.npy", GOOD_NPY > 0.5, "dtype"),
    "npy-structured": _npy("st.npy", np.zeros((4, 4, 4), [("a", "f4"), ("b", "i4")]), "dtype"),
    "npy-uint8-0-255": _npy("u8.npy", (GOOD_NPY * 255).astype(np.uint8), r"\[0, 1\]"),
    "npy-nan": _npy("nan.npy", np.where(GOOD_NPY > 0.9, np.nan, GOOD_NPY), "NaN or Inf"),
    "npy-inf": _npy("inf.npy", np.where(GOOD_NPY > 0.9, np.inf, GOOD_NPY), "NaN or Inf"),
    "npy-object-array-pickle": lambda d: _npy("obj.npy", np.array([Marker(d / "PWNED")], object), "unpickled")(d),
    "npy-raw-pickle-named-npy": lambda d: Expect(touch(d / "p.npy", pickle.dumps(Marker(d / "PWNED"))), ["p.npy"],
                                                 "unreadable"),
    "npy-npz-archive-named-npy": lambda d: Expect(_npz(d / "z.npy"), ["z.npy"], "npz"),
    "npy-truncated-data": lambda d: Expect(cut(_npy("t.npy", GOOD_NPY, "")(d).target, 300), ["t.npy"], "unreadable"),
    "npy-truncated-header": lambda d: Expect(cut(_npy("h.npy", GOOD_NPY, "")(d).target, 40), ["h.npy"],
                                             "unreadable"),
    "npy-header-not-a-dict": lambda d: Expect(npy_raw(d / "x.npy", "__import__('os').mkdir('PWNED')"), ["x.npy"],
                                              "unreadable"),
})  # fmt: skip


def _npz(p: Path) -> Path:
    with p.open("wb") as fh:
        np.savez(fh, a=GOOD_NPY)
    return p


@pytest.mark.parametrize("cid", list(VOLUME))
def test_malformed_volume(tmp_path: Path, cid: str) -> None:
    check_volume_case(VOLUME[cid], tmp_path)


def test_pickles_never_run(tmp_path: Path) -> None:
    control = tmp_path / "control.npy"
    np.save(control, np.array([Marker(tmp_path / "RAN")], object), allow_pickle=True)
    np.load(control, allow_pickle=True)  # what unpickling would do: the payload is live
    assert (tmp_path / "RAN").is_dir()
    np.save(tmp_path / "evil.npy", np.array([Marker(tmp_path / "PWNED")], object), allow_pickle=True)
    (tmp_path / "raw.npy").write_bytes(pickle.dumps(Marker(tmp_path / "PWNED")))
    for name in ("evil.npy", "raw.npy"):
        with pytest.raises(DataError, match=name):
            load_volume(tmp_path / name)
        with pytest.raises(DataError, match=name):
            load_study(tmp_path / name, DataConfig(size=(4, 4, 4)))
    (tmp_path / "m.jsonl").write_text(json.dumps({**GOOD, "image": "evil.npy"}) + "\n")
    report = validate_dataset(tmp_path / "m.jsonl", DataConfig(size=(4, 4, 4)))
    assert not report.ok and "evil.npy" in report.format()
    assert not (tmp_path / "PWNED").exists()
