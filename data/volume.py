"""Volumes: NIfTI / DICOM / M3D .npy -> oriented, normalised, resized tensors and slice views.

    load_volume(path, size=(D, H, W), modality="auto", **options) -> float32 [1, D, H, W] in [0, 1]
    load_volume_from_config(path, cfg: DataConfig, rescale=None)  -> float32 [1, D, H, W]
    slice_views(volume [1, D, H, W], slice_size=(h, w), planes=("axial",), num_slices=0)
        -> slices [S, 1, h, w], plane [S] long, index [S] long, pos [S] float
    load_study(path | [paths], cfg, train=False, rescale=None) -> Study
    augment_study(study, cfg) -> Study           the training augmentation alone (after any cache)
        volume [n_img, 1, D, H, W]; slices [n_img, S, 1, h, w]; slice_plane / slice_index /
        slice_pos [n_img, S]; native_depth list[int] (axial count of the RAS volume as stored)
    build_transforms(cfg, train=False) -> monai Compose (defined in data/transforms.py)

Reading (`_read`):
  - NIfTI: `data/nifti.py` (nibabel parses the header; the voxels are streamed in bounded chunks
    with size, truncation and gzip CRC checks; scl_slope/scl_inter applied) into a MetaTensor
    with the file's affine, in the file's own voxel order so that the [Z, Y, X] permute below
    is contiguous. Not MONAI's LoadImage: its NibabelReader trusts the header and copies the
    Fortran-ordered voxels to C order (about 1 s per 512x512x200 volume here).
  - DICOM series folder / multi-frame file: pydicom (`data/dicom.py`: sorted along the slice
    normal, RescaleSlope/Intercept applied, LPS -> RAS affine; missing slices are an error).
  - M3D `.npy`: `data/npy.py` (header checked first; `np.load(allow_pickle=False)`),
    [1, D, H, W] or [D, H, W], already in [0, 1], passed through (identity affine, no
    orientation or windowing).
Only regular files and folders are opened (a FIFO or device is a DataError at once, data/guard.py).
Inputs over `max_voxels` are refused or stride-subsampled *before* conversion to float, and the
peak memory of a load (stored voxels + float32 copies, from the header) must fit
`data.max_load_bytes` before anything is read or decompressed; no reader allocates more than the
header's claim allows the file to hold. Every malformed input
(corrupt, truncated, zero/negative sizes, NaN/Inf voxels, singular geometry) is a DataError
naming the file.

Axes: MONAI's RAS array [C, X, Y, Z] is permuted to [C, Z, Y, X]: D runs inferior -> superior,
H posterior -> anterior, W left -> right (index grows toward the patient's right, RAS+).
Axial slices index D, coronal H, sagittal W (plane ids 0, 1, 2); coronal slices are [D, W]
images and sagittal slices [D, H] images; pos = (index + 0.5) / n.

Modality "auto": the DICOM Modality tag (CT / MR); otherwise CT when a CSV `rescale` is given or
the minimum value is below -100 (HU air / fat), else MRI. CT: HU window clipped to [0, 1]
(ScaleIntensityRange); MRI: percentile min-max (ScaleIntensityRangePercentiles); npy: as is.
A constant volume gives zeros (with a warning).

CT-RATE rescale trap: `rescale=(slope, intercept)` (from the dataset's metadata CSV) is applied
only to NIfTI data that is not yet in HU: never when the NIfTI header carries its own
scl_slope/scl_inter (already applied when reading) or for DICOM (its own tags are used);
otherwise only when the values look like raw stored values: the 1st percentile of the voxels
above the minimum (the minimum itself may be an out-of-field padding value) is >= -100 (no HU
air) and the maximum is > 1500. HU data has air near -1000 and is left as it is.

`num_slices` -1: axial slices come from the normalised volume at its native depth (capped at
`max_slices`), before the resize; all images of a study are resampled to the first image's S.
Coronal / sagittal planes always come from the resized volume. `crop_foreground` crops H and W
only, so axial indices stay native. Augmentation (train=True and cfg.augment) runs after the
cache: an in-plane RandAffine rotation (about D, <= 10 deg) and H/W zoom (<= 8 %) shared by the
volume and the native axial stack (so axial slice positions stay valid), intensity scale/shift
and noise; never a left/right flip. The MONAI transforms themselves live in data/transforms.py
(`build_transforms`, `PREPROCESS_FIELDS` are re-exported here).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import nibabel as nib
import numpy as np
import torch
from einops import rearrange
from monai.data import MetaTensor
from monai.transforms import Compose
from safetensors.torch import load_file, save_file

from medvlm3d.config_fields import PLANES
from .dataset import DataConfig
from .dicom import is_dicom_file, read_dicom
from .errors import DataError
from .guard import check_budget, check_regular, plan_strides  # noqa: F401 (plan_strides: re-exported)
from .nifti import read_nifti
from .npy import read_npy
from .transforms import (PREPROCESS_FIELDS, augment_transforms, build_transforms, cfg_key,  # noqa: F401
                         eval_transforms, resize)

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
CACHE_VERSION = 1
RAW_MIN, RAW_MAX = -100.0, 1500.0  # the HU-detection thresholds of the rescale rule


@dataclass
class Study:
    """All images (series) of one study, preprocessed; see the module docstring for shapes."""

    volume: torch.Tensor
    slices: torch.Tensor
    slice_plane: torch.Tensor
    slice_index: torch.Tensor
    slice_pos: torch.Tensor
    native_depth: list[int]


# ------------------------------------------------------------------------------------- reading


def _check_spatial(shape: Sequence[int], where: str) -> None:
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise DataError(f"{where}: a 2D image of shape {tuple(shape)}; expected a 3D volume")


def _check_affine(affine: np.ndarray, where: str) -> None:
    """A finite voxel -> world matrix of full rank (zero spacing or a zeroed sform is neither)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all() or np.linalg.matrix_rank(a[:3, :3]) < 3:
        raise DataError(f"{where}: invalid voxel-to-world geometry (affine / spacing / orientation "
                        f"{np.round(a[:3], 4).tolist()}); expected a finite matrix with non-zero voxel spacing")


def _flat(image: torch.Tensor) -> torch.Tensor:
    """[1, X, Y, Z] -> 1D; a view for the readers' layouts (their [Z, Y, X] order is contiguous)."""
    t = image.as_tensor() if isinstance(image, MetaTensor) else image
    return t.permute(0, 3, 2, 1).reshape(-1)


def looks_raw_ct(values: torch.Tensor) -> bool:
    """True when CT values look like raw stored values, not yet HU (see the module docstring):
    the 1st percentile of the voxels above the minimum (on <= ~1M of them) is >= RAW_MIN and the
    maximum is > RAW_MAX."""
    flat = values.reshape(-1)
    sub = flat[:: max(1, flat.numel() // 1_000_000)].float()
    above = sub[sub > sub.min()]
    low = float(torch.quantile(above, 0.01)) if above.numel() else float(sub.min())
    return low >= RAW_MIN and float(flat.max()) > RAW_MAX


def _read(path: Path, cfg: DataConfig, rescale: tuple[float, float] | None = None) -> dict[str, Any]:
    """-> {"image": MetaTensor [1, X, Y, Z] float32 (RAS affine), "modality", "range" (min, max),
    "native_depth", "path"}."""
    if not path.exists():
        raise DataError(f"{path}: file or folder not found")
    check_regular(path, "a volume")  # a FIFO or device would block the reader forever
    plan = functools.partial(plan_strides, max_voxels=cfg.max_voxels, oversize=cfg.oversize, where=str(path))
    budget = functools.partial(check_budget, budget=cfg.max_load_bytes, where=str(path))
    name, tag_modality, header_scaled, kind = path.name.lower(), "", False, "nifti"
    try:
        if path.is_dir() or name.endswith(".dcm") or is_dicom_file(path):
            dv = read_dicom(path, plan, budget)
            kind, tag_modality, native = "dicom", dv.modality, dv.shape
            image = MetaTensor(torch.from_numpy(dv.array)[None], affine=torch.as_tensor(dv.affine),
                               meta={"space": "RAS"})
        elif name.endswith((".nii", ".nii.gz")):
            nv = read_nifti(path, plan, budget)
            native, header_scaled = nv.shape, nv.header_scaled
            image = MetaTensor(torch.from_numpy(nv.array)[None], affine=torch.as_tensor(nv.affine),
                               meta={"space": "RAS"})
        elif name.endswith(".npy"):
            kind = "npy"
            image, native = read_npy(path, plan, budget)
        else:
            raise DataError(f"{path}: unknown volume format; expected .nii/.nii.gz, .npy, a DICOM folder or file")
    except DataError:
        raise
    except Exception as e:  # corrupt / truncated files surface as many exception types
        raise DataError(f"{path}: cannot read the volume ({type(e).__name__}: {e})") from e
    _check_affine(image.affine.numpy(), str(path))
    flat = _flat(image)
    lo, hi = (float(v) for v in torch.aminmax(flat))  # one pass; NaN / Inf show up here
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise DataError(f"{path}: {int((~torch.isfinite(flat)).sum())} NaN or Inf voxels; expected finite values")
    if rescale is not None and kind != "nifti":
        logger.info("%s: rescale %s ignored for %s input (DICOM tags are used; npy is normalised)", path, rescale, kind)
    elif rescale is not None and tuple(rescale) != (1.0, 0.0):
        if header_scaled:
            logger.info("%s: NIfTI header scl_slope/scl_inter already applied; rescale %s ignored", path, rescale)
        elif looks_raw_ct(flat):
            slope, inter = float(rescale[0]), float(rescale[1])
            image = image * slope + inter
            lo, hi = sorted((lo * slope + inter, hi * slope + inter))
        else:
            logger.info("%s: values already look like HU; rescale %s not applied", path, rescale)
    if kind == "npy":
        modality = "unit"
    elif cfg.modality != "auto":
        modality = cfg.modality
    else:
        modality = tag_modality or ("ct" if rescale is not None or lo < RAW_MIN else "mri")
    z_axis = [int(a) for a in nib.orientations.io_orientation(image.affine.numpy())[:, 0]].index(2)
    return {"image": image, "modality": modality, "range": (lo, hi), "native_depth": int(native[z_axis]),
            "path": str(path)}


def _preprocess(path: Path, cfg: DataConfig, rescale: tuple[float, float] | None) -> dict[str, Any]:
    """`_read` then the eval transforms; a failure inside MONAI (on a volume that passed the
    readers' checks) still becomes a DataError naming the file."""
    raw = _read(path, cfg, rescale)
    try:
        return eval_transforms(cfg)(raw)
    except Exception as e:
        raise DataError(f"{path}: preprocessing failed ({type(e).__name__}: {e})") from e


# -------------------------------------------------------------------------------------- public


def load_volume_from_config(
    path: PathLike, cfg: DataConfig, rescale: tuple[float, float] | None = None
) -> torch.Tensor:
    """One volume -> float32 [1, D, H, W] in [0, 1], preprocessed as `cfg` says (no augmentation)."""
    flat = dataclasses.replace(cfg, num_slices=0)  # no native slice stack needed here
    return _preprocess(Path(path), flat, rescale)["image"]


def load_volume(
    path: PathLike,
    size: Sequence[int] = DataConfig.size,
    modality: str = "auto",
    *,
    hu_window: Sequence[float] = DataConfig.hu_window,
    mri_percentiles: Sequence[float] = DataConfig.mri_percentiles,
    crop_foreground: bool = False,
    max_voxels: int = DataConfig.max_voxels,
    oversize: str = "downsample",
    max_load_bytes: int = DataConfig.max_load_bytes,
    rescale: tuple[float, float] | None = None,
) -> torch.Tensor:
    """NIfTI file, DICOM folder, multi-frame DICOM file or M3D .npy -> float32 [1, D, H, W] in [0, 1]."""
    cfg = DataConfig(size=tuple(size), modality=modality, hu_window=tuple(hu_window), oversize=oversize,
                     mri_percentiles=tuple(mri_percentiles), crop_foreground=crop_foreground, max_voxels=max_voxels,
                     max_load_bytes=max_load_bytes)
    return load_volume_from_config(path, cfg, rescale)


def _plane_views(volume: torch.Tensor, plane: int, slice_size: Sequence[int], n: int) -> tuple[torch.Tensor, ...]:
    n = int(volume.shape[1 + plane]) if n <= 0 else int(n)
    h, w = slice_size
    target = [(n, h, w), (h, n, w), (h, w, n)][plane]
    pattern = ["1 n h w -> n 1 h w", "1 h n w -> n 1 h w", "1 h w n -> n 1 h w"][plane]
    return (rearrange(resize(volume, target), pattern).contiguous(), *_positions(n, plane))


def _positions(n: int, plane: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plane [n] long, index [n] long, pos [n] float = (index + 0.5) / n)."""
    index = torch.arange(n, dtype=torch.long)
    return torch.full((n,), plane, dtype=torch.long), index, (index.float() + 0.5) / n


def slice_views(
    volume: torch.Tensor,
    slice_size: Sequence[int] = DataConfig.slice_size,
    planes: Sequence[str] = ("axial",),
    num_slices: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[1, D, H, W] -> (slices [S, 1, h, w], plane [S], index [S], pos [S]); num_slices 0 (or -1)
    keeps each axis' length, N > 0 resamples each plane to N slices."""
    if not isinstance(volume, torch.Tensor) or volume.dim() != 4 or volume.shape[0] != 1:
        raise ValueError(f"volume must be a tensor [1, D, H, W], got {getattr(volume, 'shape', type(volume))}")
    if len(slice_size) != 2 or any(int(s) < 1 for s in slice_size):
        raise ValueError(f"slice_size must be two positive integers (h, w), got {slice_size!r}")
    if not planes or any(p not in PLANES for p in planes):
        raise ValueError(f"planes must be a non-empty subset of {PLANES}, got {planes!r}")
    if int(num_slices) < -1:
        raise ValueError(f"num_slices must be -1, 0 or positive, got {num_slices}")
    views = [_plane_views(volume.float(), PLANES.index(p), slice_size, int(num_slices)) for p in planes]
    return tuple(torch.cat(parts) for parts in zip(*views))  # type: ignore[return-value]


def _study_slices(d: Mapping[str, Any], cfg: DataConfig) -> tuple[torch.Tensor, ...]:
    """Slices of one preprocessed image dict: the native axial stack when num_slices == -1."""
    views = []
    for p in cfg.planes:
        if p == "axial" and "stack" in d:
            views.append((rearrange(d["stack"], "1 n h w -> n 1 h w"), *_positions(int(d["stack"].shape[1]), 0)))
        else:
            views.append(slice_views(d["image"], cfg.slice_size, (p,), max(cfg.num_slices, 0)))
    return tuple(torch.cat(parts) for parts in zip(*views))


def _assemble(dicts: list[dict[str, Any]], cfg: DataConfig, native: list[int]) -> Study:
    if "stack" in dicts[0]:  # one S per study: resample to the first image's native axial count
        n0 = int(dicts[0]["stack"].shape[1])
        for d in dicts[1:]:
            d["stack"] = resize(d["stack"], (n0, *cfg.slice_size)).float()
    parts = [_study_slices(d, cfg) for d in dicts]
    s, pl, ix, ps = (torch.stack(x) for x in zip(*parts))
    return Study(torch.stack([d["image"] for d in dicts]), s, pl, ix, ps, native)


def _to_dicts(study: Study, cfg: DataConfig) -> list[dict[str, Any]]:
    out = []
    for i in range(study.volume.shape[0]):
        d: dict[str, Any] = {"image": study.volume[i]}
        axial = study.slice_plane[i] == 0
        if cfg.num_slices == -1 and bool(axial.any()):
            d["stack"] = rearrange(study.slices[i][axial], "n 1 h w -> 1 n h w")
        out.append(d)
    return out


# ---------------------------------------------------------------------------------------- cache


def _fingerprint(p: Path) -> list[Any]:
    st = p.stat()
    entry: list[Any] = [str(p.resolve()), st.st_size, st.st_mtime_ns]
    if p.is_dir():
        entry.append(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(p) if e.is_file()))
    return entry


def cache_key(paths: Sequence[Path], cfg: DataConfig, rescale: Any = None) -> str:
    """sha256 of (version, absolute paths, sizes, mtimes, preprocessing fields of cfg, rescale)."""
    payload = {"v": CACHE_VERSION, "files": [_fingerprint(p) for p in paths], "cfg": cfg_key(cfg),
               "rescale": list(rescale) if rescale is not None else None}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _cache_read(path: Path) -> Study | None:
    if not path.is_file():
        return None
    try:
        t = load_file(str(path))
        study = Study(t["volume"], t["slices"], t["slice_plane"], t["slice_index"], t["slice_pos"],
                      [int(x) for x in t["native_depth"].tolist()])
        n, n_slices = study.slices.shape[:2]
        if study.volume.shape[0] != n or len(study.native_depth) != n or study.slice_pos.shape != (n, n_slices):
            raise ValueError("inconsistent tensor shapes")
        return study
    except Exception as e:
        logger.warning("%s: unreadable cache file (%s: %s); deleted and recomputed", path, type(e).__name__, e)
        path.unlink(missing_ok=True)
        return None


def _cache_write(path: Path, study: Study) -> None:
    tensors = {f.name: getattr(study, f.name) for f in dataclasses.fields(Study) if f.name != "native_depth"}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    tensors["native_depth"] = torch.tensor(study.native_depth, dtype=torch.long)
    from medvlm3d.io import atomic_file

    try:
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp))
    except Exception as e:  # a cache that cannot be written never stops training
        logger.warning("%s: cannot write cache file (%s: %s)", path, type(e).__name__, e)


def load_study(
    path: PathLike | Sequence[PathLike], cfg: DataConfig, train: bool = False,
    rescale: tuple[float, float] | None = None, aug_seed: int | None = None,
) -> Study:
    """One study (a path, or a list of series paths) -> Study (shapes in the module docstring).

    `rescale` (slope, intercept) from a CT-RATE metadata row follows the HU-detection rule. With
    `cfg.cache_dir` the preprocessed (never augmented) Study is cached as safetensors; augmentation
    runs afterwards, only when `train` and `cfg.augment`, seeded by `aug_seed` (training passes
    one drawn per sample, data/dataset.py), or else from torch's global RNG.
    """
    if not isinstance(cfg, DataConfig):
        raise ValueError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
    paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not paths:
        raise DataError("load_study: empty list of image paths")
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: file or folder not found")
    cache = Path(cfg.cache_dir) / f"{cache_key(paths, cfg, rescale)}.safetensors" if cfg.cache_dir else None
    study = _cache_read(cache) if cache is not None else None
    if study is None:
        dicts, native = [], []
        for p in paths:  # one native-resolution volume in memory at a time
            d = _preprocess(p, cfg, rescale)
            native.append(d["native_depth"])
            dicts.append(d)
        study = _assemble(dicts, cfg, native)
        if cache is not None:
            _cache_write(cache, study)
    return augment_study(study, cfg, aug_seed) if train and cfg.augment else study


def augment_study(study: Study, cfg: DataConfig, aug_seed: int | None = None) -> Study:
    """The training augmentation of a preprocessed Study (module docstring), seeded by `aug_seed`
    (the dataset's per-sample draw, so a resumed run repeats it), else from torch's RNG."""
    aug = Compose(augment_transforms())
    seed = int(torch.randint(0, 2**31 - 1, ()).item()) if aug_seed is None else int(aug_seed)
    aug.set_random_state(seed=seed)
    return _assemble([aug(d) for d in _to_dicts(study, cfg)], cfg, study.native_depth)
