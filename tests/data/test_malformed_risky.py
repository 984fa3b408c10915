"""Malformed volumes that could exhaust memory or crash the interpreter (issue 6), in a subprocess.

RISKY cases (truncated and bit-flipped .nii.gz, NIfTI / .npy / DICOM headers claiming absurd
sizes) run in one worker subprocess under an address-space limit of (its size after imports +
1.5 GiB): a reader that allocated what a header claims would fail there. Per case: outcome,
seconds, growth of the peak RSS; the worker must exit 0 with no traceback. A crash or hang is
pinned on the case in progress and the worker restarts with the remaining cases.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from pydicom.uid import generate_uid

from malformed_cases import TIME_LIMIT, Expect, dicom_file, edited, npy_raw, series, write_nifti
from malformed_cases import deadline  # noqa: F401  (autouse: the per-case time limit)

# ----------------------------------------------------------------- RISKY cases (in a subprocess)

RISKY: dict[str, Callable[[Path], Expect]] = {}


def _gz_base(d: Path) -> bytes:
    return write_nifti(d / "src.nii.gz").read_bytes()


def _pos(spec: str, n: int) -> int:
    """"half" -> n // 2; "-8" -> n - 8; "40" -> 40."""
    return n // 2 if spec == "half" else int(spec) % n if spec.startswith("-") else int(spec)


def _gz_case(d: Path, name: str, mutate: Callable[[bytearray], bytes], match: str) -> Expect:
    raw = bytearray(_gz_base(d))
    p = d / name
    p.write_bytes(mutate(raw))
    return Expect(p, [name], match)


for _c in ("0", "5", "40", "half", "-8", "-3"):  # empty, in the gzip header, early body, middle, trailer
    def _trunc(d: Path, cut: str = _c) -> Expect:
        def cut_at(raw: bytearray) -> bytes:
            return bytes(raw[: _pos(cut, len(raw))])
        return _gz_case(d, f"trunc{cut}.nii.gz", cut_at, r"cannot read|truncated|empty")
    RISKY[f"gz-truncated-at-{_c}"] = _trunc

# bit flips: gzip magic, method, flags; deflate stream (NIfTI header, then voxels, then its end);
# CRC-32 and ISIZE of the trailer. (A flip in the mtime bytes is harmless: a behaviour test.)
for _o in ("0", "2", "3", "12", "60", "half", "-12", "-6", "-2"):
    def _flip(d: Path, off: str = _o) -> Expect:
        def flip(raw: bytearray) -> bytes:
            raw[_pos(off, len(raw))] ^= 0x10
            return bytes(raw)
        return _gz_case(d, f"flip{off}.nii.gz", flip, r"cannot read|corrupt|truncated|CRC|invalid")
    RISKY[f"gz-bitflip-at-{_o}"] = _flip

_HUGE1 = [("<3h", 42, (32767, 32767, 32767))]  # NIfTI-1 dims are int16: the largest claim
_SIZE = r"truncated|header describes"
RISKY.update({
    "nii1-32767cubed-downsample": lambda d: Expect(edited(d / "h.nii", _HUGE1), ["h.nii"], _SIZE),
    "nii1-32767cubed-refuse-mode": lambda d: Expect(edited(d / "h.nii", _HUGE1), ["h.nii"], _SIZE,
                                                    {"oversize": "refuse"}),
    "nii1gz-32767cubed": lambda d: Expect(edited(d / "h.nii.gz", _HUGE1, gz=True), ["h.nii.gz"], _SIZE),
    "nii1gz-1000cubed-under-max-voxels": lambda d: Expect(
        edited(d / "k.nii.gz", [("<3h", 42, (1000, 1000, 1000))], gz=True), ["k.nii.gz"], _SIZE),
    "nii1gz-1000cubed-refuse-mode-small-max": lambda d: Expect(
        edited(d / "k.nii.gz", [("<3h", 42, (1000, 1000, 1000))], gz=True), ["k.nii.gz"], _SIZE + "|max_voxels",
        {"oversize": "refuse", "max_voxels": 10**6}),
    "nii2-1e6cubed": lambda d: Expect(edited(d / "n2.nii", [("<3q", 24, (10**6,) * 3)], two=True), ["n2.nii"], _SIZE),
    "nii2gz-1e6cubed": lambda d: Expect(edited(d / "n2.nii.gz", [("<3q", 24, (10**6,) * 3)], two=True, gz=True),
                                        ["n2.nii.gz"], _SIZE),
    "nii2-1e12cubed": lambda d: Expect(edited(d / "n2.nii", [("<3q", 24, (10**12,) * 3)], two=True), ["n2.nii"], _SIZE),
    "npy-claims-1e13-voxels": lambda d: Expect(
        npy_raw(d / "big.npy", {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000, 1000)}, bytes(64)),
        ["big.npy"], r"unreadable \.npy"),
    "dicom-65535x65535-rows-tiny-pixels": lambda d: Expect(
        series(d / "wide", [0, 1, 2], shape=(2, 2), Rows=65535, Columns=65535), ["IM0000"], "pixel data holds"),
    "dicom-multiframe-60000x4096x4096-tiny-pixels": lambda d: Expect(
        dicom_file(d / "mf.dcm", np.zeros((2, 2)), series=generate_uid(), NumberOfFrames=60000, Rows=4096,
                   Columns=4096), ["mf.dcm"], "pixel data holds"),
})  # fmt: skip

WORKER = r"""
import json, resource, signal, sys, time, warnings
class CaseTimeout(BaseException): pass
def fire(*_): raise CaseTimeout("time limit")
from medvlm3d.data.volume import load_volume
cases, limit, headroom = json.load(open(sys.argv[1])), float(sys.argv[2]), int(sys.argv[3])
try:
    vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print("LIMIT", vm + headroom, flush=True)
except (OSError, ValueError, StopIteration):
    print("LIMIT none", flush=True)
signal.signal(signal.SIGALRM, fire)
warnings.simplefilter("ignore")
for case in cases:
    print("START", case["id"], flush=True)
    rss0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        load_volume(case["path"], size=(4, 4, 4), **case["kwargs"])
        out = {"type": "ok", "message": ""}
    except BaseException as e:
        out = {"type": type(e).__name__, "message": str(e)}
    signal.setitimer(signal.ITIMER_REAL, 0)
    out.update(id=case["id"], seconds=time.perf_counter() - t0,
               rss_mb=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024)
    print("RESULT", json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def risky(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build every RISKY case, run them in worker subprocesses; -> {"expect", "results", "runs"}."""
    root = tmp_path_factory.mktemp("risky")
    expect = {}
    for i, (cid, build) in enumerate(RISKY.items()):
        d = root / f"c{i:02d}"
        d.mkdir()
        expect[cid] = build(d)
    todo = [{"id": c, "path": str(e.target), "kwargs": e.kwargs} for c, e in expect.items()]
    results: dict[str, dict[str, Any]] = {}
    runs: list[tuple[int | None, str]] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    while todo:
        cases_file = root / f"cases{len(runs)}.json"
        cases_file.write_text(json.dumps(todo))
        cmd = [sys.executable, "-c", WORKER, str(cases_file), str(TIME_LIMIT), str(3 * 2**29)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=45 + 2 * len(todo), env=env)
            rc, out, err = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:
            def text(b: Any) -> str:
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            rc, out, err = None, text(e.stdout), text(e.stderr) + "\n[killed: worker timeout]"
        runs.append((rc, err))
        started = None
        for line in out.splitlines():
            if line.startswith("START "):
                started = line[6:]
            elif line.startswith("RESULT "):
                r = json.loads(line[7:])
                results[r["id"]] = r
                started = None
        if started is not None:  # the worker died (or hung) during this case
            results[started] = {"type": "crash" if rc is not None else "hang", "message": err[-2000:],
                                "seconds": float("nan"), "rss_mb": 0.0}
        todo = [c for c in todo if c["id"] not in results]
        if started is None and todo:  # died before its first case (e.g. the import failed)
            for c in todo:
                results[c["id"]] = {"type": "worker-failed", "message": err[-2000:], "seconds": 0.0, "rss_mb": 0.0}
            todo = []
    return {"expect": expect, "results": results, "runs": runs}


@pytest.mark.slow  # the worker's start (imports) takes ~6 s, once for all the RISKY cases
@pytest.mark.parametrize("cid", list(RISKY))
def test_risky_input_in_subprocess(risky: dict[str, Any], cid: str) -> None:
    r, e = risky["results"][cid], risky["expect"][cid]
    assert r["type"] == "DataError", f"{cid}: {r['type']}: {r['message']}"
    assert all(n in r["message"] for n in e.names), r["message"]
    assert re.search(e.match, r["message"], re.I), r["message"]
    assert "MemoryError" not in r["message"]  # refused from the header, not by running out of memory
    assert r["seconds"] < TIME_LIMIT and r["rss_mb"] < 256, r


@pytest.mark.slow
def test_risky_worker_never_crashed(risky: dict[str, Any]) -> None:
    assert len(risky["runs"]) == 1, [err[-500:] for _, err in risky["runs"]]
    rc, err = risky["runs"][0]
    assert rc == 0, err[-2000:]
    for bad in ("Traceback", "Fatal Python error", "Segmentation fault", "core dumped"):
        assert bad not in err, err[-2000:]
