"""MONAI dictionary transforms of the volume pipeline (used by data/volume.py).

    build_transforms(cfg, train=False) -> Compose over `volume._read`'s dict:
        {"image": MetaTensor [1, X, Y, Z] float32 (RAS affine), "modality": "ct" | "mri" | "unit",
         "range": (min, max), "path": str, ...}
        -> "image" float32 [1, D, H, W] in [0, 1] at cfg.size, and with num_slices == -1 (axial
           plane) "stack" float32 [1, S, h, w]: the native axial slices (S = min(D_native, max_slices))
    eval_transforms(cfg) -> the cached eval Compose of cfg (no augmentation)
    augment_transforms() -> the training augmentation, applied after the cache
    resize(img [C, *spatial], size) -> [C, *size]   ("area" when shrinking, then (bi/tri)linear)

Steps: Orientationd to RAS; Transposed [C, X, Y, Z] -> [C, Z, Y, X]; intensity by modality (CT:
HU window, MRI: percentile min-max, npy "unit": as is; a constant volume -> zeros with a
warning); optional H/W foreground crop (D kept whole, so axial indices stay native); optional
native axial stack; resize. Augmentation: an in-plane RandAffine shared by the volume and the
native stack (rotation about D <= 10 deg, H/W zoom <= 8 %), intensity scale/shift, noise; never
a left/right flip.
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from typing import Any, Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import (Compose, CopyItemsd, EnsureTyped, Lambdad, MapTransform, Orientationd,
                              RandAffine, RandGaussianNoised, Randomizable, RandScaleIntensityd, RandShiftIntensityd,
                              Resize, ScaleIntensityRange, ScaleIntensityRangePercentiles, SpatialCrop, Transposed)
from monai.transforms.utils import generate_spatial_bounding_box

from .dataset import DataConfig

# DataConfig fields that change the preprocessing (and so the cache key of data/volume.py)
PREPROCESS_FIELDS = ("size", "slice_size", "num_slices", "max_slices", "planes", "modality", "hu_window",
                     "mri_percentiles", "crop_foreground", "max_voxels", "oversize")


def resize(img: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[C, *spatial] -> [C, *size]: MONAI Resize, "area" on shrinking axes then "trilinear" on growing ones."""
    size = tuple(int(s) for s in size)
    shape = tuple(img.shape[1:])
    shrunk = tuple(min(s, t) for s, t in zip(shape, size))
    if shrunk != shape:
        img = Resize(shrunk, mode="area")(img)
    if shrunk != size:
        img = Resize(size, mode="trilinear" if len(size) == 3 else "bilinear", align_corners=False)(img)
    return img.as_tensor() if isinstance(img, MetaTensor) else img


class Intensityd(MapTransform):
    """CT window / MRI percentiles / pass-through, by `data["modality"]`; constant -> zeros."""

    def __init__(self, keys: Any, hu_window: Sequence[float], mri_percentiles: Sequence[float]) -> None:
        super().__init__(keys)
        self.ct = ScaleIntensityRange(a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True)
        self.mri = ScaleIntensityRangePercentiles(mri_percentiles[0], mri_percentiles[1], 0.0, 1.0, clip=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            lo, hi = d.get("range") or (float(v) for v in torch.aminmax(img))  # "range": from _read
            if lo == hi:
                warnings.warn(f"{d.get('path', key)}: constant volume ({lo}); normalised to zeros")
                d[key] = torch.zeros_like(img)
            elif d.get("modality") == "ct":
                d[key] = self.ct(img)
            elif d.get("modality") == "mri":
                d[key] = self.mri(img)
        return d


class CropForegroundHWd(MapTransform):
    """Crop H and W to the voxels above `threshold` (+ margin); D is kept whole (native axial indices)."""

    def __init__(self, keys: Any, threshold: float = 0.05, margin: int = 2) -> None:
        super().__init__(keys)
        self.threshold, self.margin = threshold, margin

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            start, end = generate_spatial_bounding_box(img, lambda x: x > self.threshold, margin=self.margin)
            if any(e - s < 2 for s, e in zip(start[1:], end[1:])):
                continue  # no foreground: keep the whole volume
            d[key] = SpatialCrop(roi_start=[0, *start[1:]], roi_end=[img.shape[1], *end[1:]])(img)
        return d


def native_stack(img: torch.Tensor, slice_size: Sequence[int], max_slices: int) -> torch.Tensor:
    """[1, D, H, W] -> [1, S, h, w]: the native axial slices, S = min(D, max_slices)."""
    return resize(img, (min(int(img.shape[1]), max_slices), *slice_size))


class SharedRandAffined(Randomizable, MapTransform):
    """RandAffine with the same random draw on keys of different spatial sizes (RandAffined builds
    one grid from the first key, so it cannot serve a volume and a slice stack together)."""

    def __init__(self, keys: Any, **kwargs: Any) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        self.affine = RandAffine(**kwargs)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        self._seed = int(self.R.randint(2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            self.affine.set_random_state(seed=self._seed)
            d[key] = self.affine(d[key])
        return d


def preprocess_transforms(cfg: DataConfig) -> list[Any]:
    out: list[Any] = [
        Orientationd(keys="image", axcodes="RAS", labels=None),  # labels from the meta "space" (RAS)
        Transposed(keys="image", indices=(0, 3, 2, 1)),  # [C, X, Y, Z] -> [C, Z, Y, X] = [1, D, H, W]
        Intensityd(keys="image", hu_window=cfg.hu_window, mri_percentiles=cfg.mri_percentiles),
    ]
    if cfg.crop_foreground:
        out.append(CropForegroundHWd(keys="image"))
    if cfg.num_slices == -1 and "axial" in cfg.planes:
        stack = functools.partial(native_stack, slice_size=tuple(cfg.slice_size), max_slices=cfg.max_slices)
        out += [CopyItemsd(keys="image", names="stack"), Lambdad(keys="stack", func=stack)]
    out += [Lambdad(keys="image", func=functools.partial(resize, size=tuple(cfg.size))),
            EnsureTyped(keys=["image", "stack"], dtype=torch.float32, track_meta=False, allow_missing_keys=True)]
    return out


def augment_transforms() -> list[Any]:
    keys = ["image", "stack"]
    return [
        # in-plane only (rotation about D, zoom of H and W): axial slice positions stay valid
        SharedRandAffined(keys, prob=0.5, rotate_range=(math.radians(10), 0.0, 0.0), scale_range=(0.0, 0.08, 0.08),
                           mode="bilinear", padding_mode="zeros"),
        RandScaleIntensityd(keys, factors=0.1, prob=0.5, allow_missing_keys=True),
        RandShiftIntensityd(keys, offsets=0.05, prob=0.5, allow_missing_keys=True),
        RandGaussianNoised("image", prob=0.3, std=0.01, allow_missing_keys=True),
        RandGaussianNoised("stack", prob=0.3, std=0.01, allow_missing_keys=True),
        Lambdad(keys, functools.partial(torch.clamp, min=0.0, max=1.0), allow_missing_keys=True),
        EnsureTyped(keys, dtype=torch.float32, track_meta=False, allow_missing_keys=True),
    ]


def build_transforms(cfg: DataConfig, train: bool = False) -> Compose:
    """The MONAI dictionary Compose: orient, normalise, (crop), (native axial stack), resize, then
    (train and cfg.augment) augmentation. Input: `volume._read`'s dict; output "image" [1, D, H, W]."""
    return Compose(preprocess_transforms(cfg) + (augment_transforms() if train and cfg.augment else []))


def cfg_key(cfg: DataConfig) -> str:
    """JSON of the preprocessing fields of `cfg` (the transform and cache key)."""
    return json.dumps({f: getattr(cfg, f) for f in PREPROCESS_FIELDS}, sort_keys=True, default=list)


@functools.lru_cache(maxsize=16)
def _cached(key: str) -> Compose:
    cfg = DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(key).items()})
    return build_transforms(cfg, train=False)


def eval_transforms(cfg: DataConfig) -> Compose:
    """The (cached) eval Compose of `cfg`; augmentation is applied separately, after the cache."""
    return _cached(cfg_key(cfg))



__all__ = [
    "PREPROCESS_FIELDS", "CropForegroundHWd", "Intensityd", "SharedRandAffined", "augment_transforms",
    "build_transforms", "cfg_key", "eval_transforms", "native_stack", "preprocess_transforms", "resize",
]  # fmt: skip
