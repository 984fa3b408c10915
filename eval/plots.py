"""Figures for inference: where the model looked in a volume.

    slice_image(volume [1, D, H, W], plane, index) -> numpy [a, b] in [0, 1], in display orientation
    to_uint8(image [a, b]) -> numpy uint8 [a, b] (8-bit grey)
    slice_score_figure(volume [1, D, H, W], slice_plane [S], slice_index [S], weights [S],
                       picks {plane: [indices]}, ...) -> matplotlib Figure
    save_slice_score_plot(path, ...)  -> Path (PNG, written atomically)

The figure: a strip of the `top_k` highest-weighted slices (grey images, each titled with plane,
index and weight) above one bar plot per plane of the weights along that plane's axis (z for
axial), the top slices highlighted, the uniform level dashed, and the Vote-MI picks marked with
triangles. The weights are the TG-IS scores when the model has them; otherwise (3d_only /
2d_only) the Vote-MI votes, normalised, with the strip showing the Vote-MI picks instead.

Display orientation (radiological convention): axial slices with anterior up and the patient's
right on the viewer's left; coronal with superior up and the patient's right on the left;
sagittal with superior up and anterior on the left. With the volume axes of data/volume.py
(D inferior -> superior, H posterior -> anterior, W patient's left -> right), that is every
slice flipped in both axes.

Slice indices: `slice_index` counts slices within their plane as the model saw them (S_p slices
of plane p at positions (index + 0.5) / S_p); the image of a slice is taken from the volume at
the same position, so the figure stays correct when S_p differs from the volume's extent.
Vote-MI picks index the volume's axis of that plane and are mapped onto the same scale.

Matplotlib runs with the Agg backend (no display needed); `matplotlib.use` is not called, the
figure is built with the object API (`matplotlib.figure.Figure`), so the caller's backend is left
alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medvlm3d.config import PLANES

log = logging.getLogger(__name__)

TOP_COLOUR = "#e6550d"
BAR_COLOUR = "#9ecae1"
PICK_COLOUR = "#31a354"
AXIS_NAME = {"axial": "z (inferior -> superior)", "coronal": "y (posterior -> anterior)",
             "sagittal": "x (patient's left -> right)"}


def slice_image(volume: torch.Tensor, plane: str, index: int) -> np.ndarray:
    """One slice of volume [1, D, H, W] -> float numpy [a, b] in display orientation (see the module
    docstring): axial [H, W], coronal [D, W], sagittal [D, H]."""
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"volume must be [1, D, H, W], got {tuple(volume.shape)}")
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    axis = PLANES.index(plane)
    n = int(volume.shape[1 + axis])
    if not 0 <= int(index) < n:
        raise ValueError(f"{plane} slice index {index} out of range 0..{n - 1}")
    img = volume[0].select(axis, int(index)).detach().float().cpu().numpy()
    return np.ascontiguousarray(img[::-1, ::-1])


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[a, b] values in [0, 1] -> uint8 [a, b] (clipped)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def volume_index(volume: torch.Tensor, plane: str, index: int, n_slices: int) -> int:
    """The volume index along `plane`'s axis at the position of slice `index` of `n_slices`."""
    n = int(volume.shape[1 + PLANES.index(plane)])
    return min(n - 1, int((int(index) + 0.5) / n_slices * n))


def _scale_index(index: int, n_from: int, n_to: int) -> float:
    """Slice `index` of `n_from` as a (fractional) index on a scale of `n_to` slices."""
    return (index + 0.5) / n_from * n_to - 0.5


def slice_score_figure(
    volume: torch.Tensor,
    slice_plane: Sequence[int] | torch.Tensor,
    slice_index: Sequence[int] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor,
    picks: Mapping[str, Sequence[int]] | None = None,
    *,
    title: str = "",
    weight_label: str = "TG-IS score",
    top_k: int = 6,
    strip: Sequence[int] | None = None,
) -> Figure:
    """The figure described in the module docstring.

    slice_plane / slice_index / weights: [S] over the model's real slices (plane ids as in
    PLANES); picks: Vote-MI picks per plane name, as indices of the volume's axis; strip: the
    positions (into the S arrays) to show as images, default the `top_k` highest weights.
    """
    plane_ids = np.asarray(torch.as_tensor(slice_plane).cpu(), dtype=np.int64)
    index = np.asarray(torch.as_tensor(slice_index).cpu(), dtype=np.int64)
    w = np.asarray(torch.as_tensor(weights).float().cpu(), dtype=np.float64)
    if not (plane_ids.shape == index.shape == w.shape) or w.ndim != 1 or w.size == 0:
        raise ValueError(f"slice_plane, slice_index and weights must be the same non-empty [S]; got "
                         f"{plane_ids.shape}, {index.shape}, {w.shape}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    picks = dict(picks or {})
    if strip is None:
        strip = np.argsort(-w, kind="stable")[: min(top_k, w.size)].tolist()
    strip = list(strip)
    present = [p for p in range(len(PLANES)) if (plane_ids == p).any()]
    n_strip = max(1, len(strip))

    fig = Figure(figsize=(max(8.0, 1.9 * n_strip), 3.0 + 2.0 * len(present)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1 + len(present), n_strip, height_ratios=[1.3] + [1.0] * len(present))
    counts = {p: int((plane_ids == p).sum()) for p in present}
    for col, j in enumerate(strip):
        ax = fig.add_subplot(grid[0, col])
        plane = PLANES[int(plane_ids[j])]
        n_axis = int(volume.shape[1 + int(plane_ids[j])])
        vi = volume_index(volume, plane, int(index[j]), counts[int(plane_ids[j])])
        picked = any(round(_scale_index(int(i), n_axis, counts[int(plane_ids[j])])) == int(index[j])
                     for i in picks.get(plane, []))
        ax.imshow(slice_image(volume, plane, vi), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"#{col + 1} {plane} {int(index[j])}\n{w[j]:.3f}" + (" (Vote-MI)" if picked else ""),
                     fontsize=9, color=PICK_COLOUR if picked else "black")
        ax.set_xticks([])
        ax.set_yticks([])
    top = set(strip)
    for row, p in enumerate(present, start=1):
        ax = fig.add_subplot(grid[row, :])
        plane = PLANES[p]
        sel = np.flatnonzero(plane_ids == p)
        colours = [TOP_COLOUR if j in top else BAR_COLOUR for j in sel]
        ax.bar(index[sel], w[sel], width=0.85, color=colours, edgecolor="none")
        ax.axhline(1.0 / w.size, color="grey", linestyle="--", linewidth=0.8, label="uniform")
        n_axis = int(volume.shape[1 + p])
        marks = [_scale_index(int(i), n_axis, counts[p]) for i in picks.get(plane, [])]
        if marks:
            ymax = float(w[sel].max()) if w[sel].size else 1.0
            ax.plot(marks, [ymax * 1.08] * len(marks), "v", color=PICK_COLOUR, markersize=7, label="Vote-MI pick")
            ax.set_ylim(0, ymax * 1.2 if ymax > 0 else 1.0)
        ax.set_xlim(-0.6, counts[p] - 0.4)
        ax.set_xlabel(f"{plane} slice index, {AXIS_NAME[plane]}", fontsize=9)
        ax.set_ylabel(weight_label, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=2, frameon=False,
                  borderaxespad=0.1)
    if title:
        fig.suptitle("".join(c if (c.isprintable() and c != "\ufffd") or c == "\n" else "?" for c in title), fontsize=10)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> Path:
    """Write `fig` as PNG to `path` atomically (temporary sibling, then rename)."""
    from medvlm3d.io import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(path)


def save_slice_score_plot(path: str | os.PathLike, *args, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    """`slice_score_figure(*args, **kwargs)` saved as PNG at `path`."""
    out = save_figure(slice_score_figure(*args, **kwargs), path)
    log.info("wrote slice-score plot %s", out)
    return out
