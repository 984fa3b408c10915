"""medvlm3d.io: atomic writes leave either the old content or the whole new one, and no temporaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medvlm3d.io import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_json, atomic_write_text


def test_writes_content_and_leaves_no_temporary(tmp_path: Path) -> None:
    assert atomic_write_text(tmp_path / "a" / "x.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    assert atomic_write_bytes(tmp_path / "a" / "y.bin", b"\x00\x01") .read_bytes() == b"\x00\x01"
    atomic_write_json(tmp_path / "a" / "z.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "a" / "z.json").read_text()) == {"k": [1, 2]}
    atomic_write_text(tmp_path / "a" / "x.txt", "second")
    assert (tmp_path / "a" / "x.txt").read_text() == "second"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.txt", "y.bin", "z.json"]


def test_old_file_intact_when_the_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_file_keeps_the_suffix_for_format_sniffing(tmp_path: Path) -> None:
    with atomic_file(tmp_path / "v.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "v.nii.gz").read_bytes() == b"x"


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (final / "a.txt").read_text() == "1"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "b.txt").write_text("2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    with atomic_dir(final) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
