"""Slice selectors: parameter-free functions of one image's slices, run on the data side.

    selector = SELECTORS.build(name, cfg: VoteMIConfig, num_picks: int)
    selector(slices [S, 1, h, w], plane [S] long, mask [S] bool | None, index: int = 0,
             slice_target [S] float | None = None) -> SliceSelection(teacher, keep)

    teacher [S] float32: a distribution over the real slices (sums to 1 over mask, exactly 0 on
            padding), the TG-IS distillation target; None when `cfg.teacher == "off"`.
    keep    [num_picks] long: picked slice positions, sorted, split over the planes present
            (plane p gets num_picks // P, the first num_picks % P planes one more), cycled when a
            plane has fewer slices than its share; None when the selector does not pick.

`index` is the sample's position in its dataset: what a seeded selector (random) seeds from,
so that a sample gets the same picks in every epoch and worker, whatever the global RNG does.
Registering one: a file in data/select/ with `@SELECTORS.register("name")` on a class taking
(cfg, num_picks); the package imports every module of the folder. A class attribute
`slices_only = True` says its output depends on the slices alone (not on `index` or
`slice_target`), so `medvlm3d preprocess` may compute it once and store it in the shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from medvlm3d.config_fields import check_choice
from medvlm3d.data.errors import ConfigError
from medvlm3d.registry import Registry

SELECTORS = Registry("selector")


@dataclass
class VoteMIConfig:
    """The `model.vote_mi:` section: slice selection and the teacher distribution, computed on
    the data side (this package), before any encoder."""

    selector: str = "votek"  # a name registered in SELECTORS
    k: int = 5  # each slice votes for its k nearest neighbours
    num_picks: int = 4
    teacher: str = "picks"  # off | votes | picks
    features: str = "intensity"  # intensity only (selectors run on the data side, before any encoder)
    feature_size: int = 16  # side of the downsampled slice used by intensity features
    seed: int = 0  # the `random` / `vote_mi_brainmd` selectors' seed (combined with each sample's index)
    # vote_mi_brainmd (data/select/vote_mi_brainmd.py); defaults = BrainMD's released code
    latent: str = "pca"  # pca (no network) | vae (a trained VAE encoder at vae_path)
    vae_path: str = ""  # safetensors of the VAE encoder (latent: vae)
    dbscan_eps: float = 0.18  # inference_DBSCAN.py: DBSCAN(eps=0.18, min_samples=25)
    dbscan_min_samples: int = 25

    def __post_init__(self) -> None:
        check_choice("vote_mi.teacher", self.teacher, ("off", "votes", "picks"))
        if self.features == "encoder":
            raise ConfigError(
                "vote_mi.features=encoder is no longer supported: slice selection runs on the data side, "
                "before the slice encoder, so it cannot use encoder features; use vote_mi.features=intensity"
            )
        check_choice("vote_mi.features", self.features, ("intensity",))
        check_choice("vote_mi.latent", self.latent, ("pca", "vae"))
        if self.dbscan_eps <= 0 or self.dbscan_min_samples < 1:
            raise ConfigError(f"vote_mi.dbscan_eps must be > 0 and vote_mi.dbscan_min_samples >= 1, "
                              f"got {self.dbscan_eps}, {self.dbscan_min_samples}")
        if self.k < 1 or self.num_picks < 1:
            raise ConfigError("vote_mi.k and vote_mi.num_picks must be >= 1")


@dataclass
class SliceSelection:
    """What a selector says about one image's S slices."""

    teacher: torch.Tensor | None  # [S] float32, sums to 1 over the real slices, 0 on padding
    keep: torch.Tensor | None  # [k] long, sorted slice positions


class SimpleSelector:
    """Constructor shared by the parameter-free selectors: the teacher is on unless
    `cfg.teacher == "off"`; `cfg.seed` seeds the ones that draw."""

    def __init__(self, cfg: object, num_picks: int) -> None:
        self.teacher_on = getattr(cfg, "teacher", "picks") != "off"
        self.seed = int(getattr(cfg, "seed", 0))
        self.num_picks = int(num_picks)


class Selector(Protocol):
    def __call__(
        self,
        slices: torch.Tensor,
        plane: torch.Tensor,
        mask: torch.Tensor | None = None,
        index: int = 0,
        slice_target: torch.Tensor | None = None,
    ) -> SliceSelection: ...


def real_mask(plane: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[S] bool: the real slices (all when mask is None); at least one must be real."""
    m = torch.ones(plane.shape[0], dtype=torch.bool) if mask is None else mask.detach().cpu().bool()
    if tuple(m.shape) != tuple(plane.shape) or plane.ndim != 1:
        raise ValueError(f"selector: plane and mask must both be [S], got {tuple(plane.shape)}, {tuple(m.shape)}")
    if not bool(m.any()):
        raise ValueError("selector: no real slice (mask all False)")
    return m


def plane_groups(plane: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """The real slice positions of each plane present, planes in id order: a list of [n_p] long."""
    plane = plane.detach().cpu().long()
    return [(mask & (plane == p)).nonzero().flatten() for p in sorted(set(plane[mask].tolist()))]


def shares(num_picks: int, n_planes: int) -> list[int]:
    """How many picks each plane gets: num_picks split evenly, the first planes one more."""
    return [num_picks // n_planes + (i < num_picks % n_planes) for i in range(n_planes)]


def per_plane_keep(
    plane: torch.Tensor, mask: torch.Tensor, num_picks: int,
    pick: Callable[[torch.Tensor, int], list[int]],
) -> torch.Tensor:
    """keep [num_picks] long, sorted: `pick(ids [n_p] of one plane, share) -> positions` is asked
    for each plane's share; a plane short of slices repeats its picks (cycled)."""
    groups = plane_groups(plane, mask)
    out: list[int] = []
    for ids, n in zip(groups, shares(num_picks, len(groups))):
        if n == 0:
            continue
        got = list(pick(ids, min(n, ids.numel()))) or [int(ids[0])]
        out.extend((got * n)[:n])
    return torch.tensor(sorted(out), dtype=torch.long)


def teacher_on(keep: torch.Tensor, mask: torch.Tensor, eps: float = 0.05) -> torch.Tensor:
    """[S] float32: (1 - eps) uniform over the distinct kept slices + eps uniform over the real ones."""
    w = torch.zeros(mask.shape[0], dtype=torch.float64)
    w[keep.unique()] = 1.0
    uniform = mask.double() / mask.sum()
    return ((1.0 - eps) * w / w.sum() + eps * uniform).float()


def build_selector(name: str, cfg: object, num_picks: int) -> Selector:
    """SELECTORS.build with the package's modules imported (so that every file is registered)."""
    import medvlm3d.data.select  # noqa: F401  (registers the built-in selectors)

    return SELECTORS.build(name, cfg, num_picks)
