"""Atomic writes: a file or folder is either the old one or the whole new one, never half written.

    atomic_write_bytes(path, data) / atomic_write_text(path, text) / atomic_write_json(path, obj)
        write a temporary sibling (same folder, so the rename stays on one file system), fsync it,
        then `os.replace` it over `path`. Parent folders are created. Returns `path`.
    atomic_file(path) -> context manager yielding a temporary sibling path, for writers that need
        a file name (nibabel, PIL, matplotlib, safetensors); on a clean exit it is fsynced and
        renamed over `path`; on an exception it is deleted and `path` is left as it was.
    atomic_dir(path) -> context manager yielding a temporary sibling folder to fill; on a clean
        exit every file in it is fsynced and the folder replaces `path` (an old `path` is first
        renamed aside, then deleted); on an exception the temporary folder is deleted.
    fsync_tree(folder): fsync every file under `folder`.
    swap_dir(tmp, final): move a finished folder `tmp` over `final` (the last step of atomic_dir).
    is_no_space(exc, path): whether `exc` (or an exception it was raised from) is a full disk:
        errno ENOSPC/EDQUOT, or torch's errno-less writer errors ("enforce fail at inline_container",
        "file write failed") while `path`'s file system has under 64 MiB free.
    NoSpaceLeft(path, exc): the OSError (errno ENOSPC) raised instead, "no space left on <path>";
        the CLI turns it into one line and exit 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_file", "atomic_dir",
           "fsync_tree", "swap_dir", "is_no_space", "NoSpaceLeft"]

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL = 64 << 20  # bytes: below this, torch's errno-less writer failure is taken as a full disk


class NoSpaceLeft(OSError):
    """A write failed because the file system of `path` is full (errno ENOSPC)."""

    def __init__(self, path: str | os.PathLike, cause: BaseException | None = None) -> None:
        detail = f" ({' '.join(str(cause).split())[:200]})" if cause is not None else ""
        super().__init__(errno.ENOSPC, f"no space left on {path}{detail}", str(path))

    def __str__(self) -> str:
        return str(self.strerror)


def is_no_space(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """True when `exc` or its causes/contexts is a full-disk error (see the module docstring)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if "No space left" in str(e):
            return True
        if path is not None and ("inline_container" in str(e) or "file write failed" in str(e)):
            try:
                if shutil.disk_usage(path).free < _NEARLY_FULL:
                    return True
            except OSError:
                pass
        e = e.__cause__ or e.__context__
    return False


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every regular file under `folder` (so a rename after it publishes whole files)."""
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            _fsync_file(p)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same suffix, so format sniffing by name works);
    publish it at `path` on a clean exit, delete it on an exception."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(out.suffixes[-2:]) if out.name.endswith(".nii.gz") else out.suffix
    # A unique name that the writer creates itself, so the file gets the usual umask permissions.
    tmp = out.with_name(f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temporary sibling, fsync, os.replace)."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically; newlines are written as given (no translation)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """`json.dumps(obj)` plus a final newline, written to `path` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def swap_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the finished folder `tmp` to `final`; an existing `final` is renamed aside first and
    deleted after, so `final` is always either the old folder or the new one."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder next to `path`; on a clean exit fsync its files and swap it
    in as `path` (see swap_dir); on an exception (KeyboardInterrupt too) delete it."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        swap_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
