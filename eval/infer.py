"""Inference on a user's own scan, Vote-MI slice selection for 2D VLMs, and checkpoint export.

Python API:
    infer(checkpoint | model, volume, prompt=None, task="vqa", device="cpu", max_new_tokens=None,
          plot=None, json_path=None, top_k=6, device_map=None) -> dict
        {answer, prompt, volume, task, variant, score_kind ("tgis" | "none"),
         slice_scores: [{plane, index, score}]   TG-IS scores over the real slices (sum 1; [] when
                                                 the variant has none: 3d_only / 2d_only); with
                                                 model.preselect_k only the k kept slices, each
                                                 under its own index in the volume,
         teacher: [{plane, index, weight}]       the data-side selector's teacher ([] when off),
         vote_mi: {plane: {indices, votes}}      Vote-MI picks (pick order) and per-slice votes on
                                                 the preprocessed volume [1, D, H, W] (axial index D,
                                                 coronal H, sagittal W), with the checkpoint's vote_mi
                                                 config (k neighbours, num_picks, feature_size),
         timing: {load_s, preprocess_s, generate_s, vote_mi_s} in seconds}
    select(volume, k=3, planes=PLANES, neighbours=5, size=None, out=..., modality="auto") -> dict
        Vote-MI alone (no checkpoint): `<out>/<plane>_<index>.png` (8-bit grey, radiological
        display orientation, see eval/plots.py) + `<out>/selection.json`.
    export(checkpoint, out, merge_lora=False) -> Path   (moved to model/export.py; re-exported)

Command line: `medvlm3d infer | select` (medvlm3d/cli/infer.py, select.py); `export` lives in
model/export.py. Bad input (missing checkpoint or volume, bad option) raises DataError/ConfigError.

Preprocessing always comes from the checkpoint's own `cfg.data`. The volume is read once: the
preprocessed tensor [1, D, H, W] feeds both `model.generate` and Vote-MI (identical to passing
the path, since generate slices it with the same `slice_views`), except when
`data.num_slices == -1` (native axial stack), where generate gets the path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from medvlm3d.config import PLANES, DataConfig
from medvlm3d.data.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASKS = ("vqa", "report")


# ------------------------------------------------------------------------------------- helpers


def _write_json(obj: Any, path: str | os.PathLike) -> Path:
    from medvlm3d.io import atomic_write_json

    return atomic_write_json(path, obj)


def _check_volume_path(volume: Any) -> None:
    if isinstance(volume, (str, os.PathLike)) and not Path(volume).exists():
        raise DataError(f"{volume}: volume file or folder not found (expected a .nii/.nii.gz file, a DICOM "
                        "folder or file, or an .npy file)")


def _check_checkpoint(path: str | os.PathLike) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: checkpoint folder not found (expected a folder written by save_pretrained / "
                        "export, holding checkpoint.json)")
    return root


def _device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device must be cpu or cuda[:N], got {device!r}") from e
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda[:N], got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return dev


def parse_device_map(text: str | None) -> Any:
    """The `--device-map` value: None, a strategy or device name ("auto", "balanced", "cuda:1"), or
    a JSON object {module name: device} (e.g. '{"model.embed_tokens": 0, "model.layers": 1, ...}')."""
    if text is None or not str(text).strip():
        return None
    text = str(text).strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--device-map: {text!r} is not a JSON object {{module name: device}} ({e})") from e
    return int(text) if text.isdigit() else text


def _map_uses_gpu(device_map: Any) -> bool:
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return torch.cuda.is_available()
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(isinstance(v, int) or (isinstance(v, (str, torch.device)) and str(v).startswith("cuda")) for v in values)


def load_model(checkpoint: str | os.PathLike, device: str = "cpu", device_map: Any = None) -> Any:
    """load_pretrained on `device`, bf16 on a GPU, float32 on the CPU. With `device_map` (e.g.
    "auto", for an LLM too large for one GPU) the LLM is dispatched over the GPUs by accelerate,
    bf16 when the map uses a GPU, and `device` is not used."""
    from medvlm3d.model.checkpoint import check_device_map, load_pretrained

    root = _check_checkpoint(checkpoint)
    if device_map is not None:
        check_device_map(device_map)
        dtype = torch.bfloat16 if _map_uses_gpu(device_map) else None
        return load_pretrained(root, dtype=dtype, device_map=device_map)
    dev = _device(device)
    return load_pretrained(root, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else None)


def preprocessed_volume(volume: Any, cfg: DataConfig) -> torch.Tensor:
    """A path (NIfTI / DICOM / npy) or a tensor -> float32 [1, D, H, W] at cfg.size, in [0, 1]."""
    from medvlm3d.data.volume import load_volume_from_config
    from medvlm3d.model.generation import study_from_tensor

    if isinstance(volume, torch.Tensor):
        return study_from_tensor(volume, cfg).volume[0]
    if not isinstance(volume, (str, os.PathLike)):
        raise DataError(f"volume must be a path or a tensor [1, D, H, W], got {type(volume).__name__}")
    _check_volume_path(volume)
    return load_volume_from_config(volume, cfg)


def _entries(plane: torch.Tensor, index: torch.Tensor, values: torch.Tensor | None, key: str) -> list[dict]:
    if values is None:
        return []
    return [{"plane": PLANES[int(p)], "index": int(i), key: float(v)} for p, i, v in zip(plane, index, values)]


# --------------------------------------------------------------------------------------- infer


def infer(
    checkpoint: Any,
    volume: Any,
    prompt: str | None = None,
    *,
    task: str = "vqa",
    device: str = "cpu",
    max_new_tokens: int | None = None,
    plot: str | os.PathLike | None = None,
    json_path: str | os.PathLike | None = None,
    top_k: int = 6,
    device_map: Any = None,
) -> dict[str, Any]:
    """Answer `prompt` about `volume` with a checkpoint folder (or an already loaded MedVLM);
    see the module docstring for the returned dict. `task="report"` without a prompt uses the
    report instruction the model was trained with (`data.readers.REPORT_QUESTION`).
    `device_map` (e.g. "auto") spreads a large LLM over several GPUs (see `load_model`)."""
    from medvlm3d.data.readers import REPORT_QUESTION
    from medvlm3d.data.select.votek import select_slices

    if task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS}, got {task!r}")
    if prompt is None or not str(prompt).strip():
        if task != "report":
            raise ConfigError("a prompt is needed (--prompt \"...\"), or --task report for the report instruction")
        prompt = REPORT_QUESTION
    if isinstance(checkpoint, (str, os.PathLike)):
        _check_checkpoint(checkpoint)
    _check_volume_path(volume)
    t0 = time.perf_counter()
    model = load_model(checkpoint, device, device_map) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    cfg = model.cfg
    t1 = time.perf_counter()
    vol = preprocessed_volume(volume, cfg.data)
    t_pre = time.perf_counter()
    native_stack = cfg.data.num_slices == -1 and not isinstance(volume, torch.Tensor)
    gen = model.generate(volume=str(volume) if native_stack else vol, prompt=prompt, max_new_tokens=max_new_tokens)
    t2 = time.perf_counter()
    vm = cfg.model.vote_mi
    picks = select_slices(vol, vm.num_picks, tuple(cfg.data.planes), vm.k, vm.feature_size)
    t3 = time.perf_counter()
    result: dict[str, Any] = {
        "answer": gen.text,
        "prompt": prompt,
        "volume": str(volume) if not isinstance(volume, torch.Tensor) else f"tensor{list(volume.shape)}",
        "task": task,
        "variant": cfg.model.variant,
        "score_kind": "tgis" if gen.scores is not None else "none",
        "slice_scores": _entries(gen.slice_plane, gen.slice_index, gen.scores, "score"),
        "teacher": _entries(gen.slice_plane, gen.slice_index, gen.teacher, "weight"),
        "vote_mi": picks,
        "timing": {"load_s": round(t1 - t0, 4), "preprocess_s": round(t_pre - t1, 4),
                   "generate_s": round(t2 - t_pre, 4), "vote_mi_s": round(t3 - t2, 4)},
    }
    if json_path is not None:
        log.info("wrote %s", _write_json(result, json_path))
    if plot is not None:
        plot_inference(result, vol, gen, plot, top_k=top_k)
    return result


def plot_inference(result: dict[str, Any], vol: torch.Tensor, gen: Any, path: str | os.PathLike,
                   top_k: int = 6) -> Path:
    """The slice-score figure of one `infer` result (see eval/plots.py): TG-IS scores when the
    variant has them, otherwise the Vote-MI votes (normalised, planes weighted equally) and picks."""
    from medvlm3d.eval.plots import save_slice_score_plot

    picks = {p: r["indices"] for p, r in result["vote_mi"].items()}
    answer = result["answer"] if len(result["answer"]) <= 70 else result["answer"][:67] + "..."
    answer = answer or "(empty answer)"
    head = f"Q: {result['prompt']}\nA: {answer}"
    if gen.scores is not None:
        return save_slice_score_plot(path, vol, gen.slice_plane, gen.slice_index, gen.scores, picks, top_k=top_k,
                                     title=f"{head}\nTG-IS slice scores (top {top_k}), Vote-MI picks marked")
    planes, index, weights, strip = [], [], [], []
    n_planes = len(result["vote_mi"])
    for name, r in result["vote_mi"].items():
        votes = torch.tensor(r["votes"], dtype=torch.float64)
        total = float(votes.sum())
        share = votes / total if total > 0 else torch.full_like(votes, 1.0 / votes.numel())
        offset = len(index)
        strip += [offset + i for i in r["indices"]]
        planes += [PLANES.index(name)] * votes.numel()
        index += list(range(votes.numel()))
        weights += (share / n_planes).tolist()
    title = (f"{head}\nno TG-IS scores in variant {result['variant']}: Vote-MI votes and picks shown instead "
             "(what a 2D reader would be given)")
    return save_slice_score_plot(path, vol, planes, index, weights, picks, title=title, weight_label="Vote-MI votes",
                                 strip=strip)


# -------------------------------------------------------------------------------------- select


def select(
    volume: str | os.PathLike,
    out: str | os.PathLike,
    k: int = 3,
    planes: Sequence[str] = PLANES,
    neighbours: int = 5,
    size: Sequence[int] | None = None,
    modality: str = "auto",
    feature_size: int = 16,
) -> dict[str, Any]:
    """Vote-MI alone on `volume` (read with `load_volume` at `size`, default DataConfig.size);
    writes `<out>/<plane>_<index>.png` per pick and `<out>/selection.json`; returns its content."""
    from PIL import Image

    from medvlm3d.data.volume import load_volume
    from medvlm3d.eval.plots import slice_image, to_uint8
    from medvlm3d.data.select.votek import select_slices
    from medvlm3d.io import atomic_file

    planes = tuple(planes)
    bad = [p for p in planes if p not in PLANES]
    if bad or not planes:
        raise ConfigError(f"planes must be a non-empty subset of {list(PLANES)}, got {list(planes)}")
    if k < 1 or neighbours < 1:
        raise ConfigError(f"k and neighbours must be >= 1, got k={k}, neighbours={neighbours}")
    size = tuple(int(s) for s in (size or DataConfig.size))
    if len(size) != 3 or min(size) < 2:
        raise ConfigError(f"size must be three integers D H W >= 2, got {list(size)}")
    _check_volume_path(volume)
    vol = load_volume(volume, size=size, modality=modality)
    chosen = select_slices(vol, k, planes, neighbours, feature_size)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "volume": str(volume), "size": list(size), "k": k, "neighbours": neighbours,
        "orientation": "radiological: axial anterior up, patient's right on the left; coronal/sagittal superior up",
        "planes": {},
    }
    for plane, r in chosen.items():
        n = len(r["votes"])
        width = max(3, len(str(n - 1)))
        files = []
        for i in r["indices"]:
            name = f"{plane}_{i:0{width}d}.png"
            with atomic_file(folder / name) as tmp:
                Image.fromarray(to_uint8(slice_image(vol, plane, i))).save(tmp, format="PNG")
            files.append(name)
        result["planes"][plane] = {"indices": r["indices"], "picked_votes": [r["votes"][i] for i in r["indices"]],
                                   "files": files, "n_slices": n, "votes": r["votes"]}
    _write_json(result, folder / "selection.json")
    log.info("wrote %d slices and selection.json to %s", sum(len(v["files"]) for v in result["planes"].values()), folder)
    return result


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, merge_lora: bool = False) -> Path:
    """Kept for old imports: `medvlm3d.model.export.export`."""
    from medvlm3d.model.export import export as _export

    return _export(checkpoint, out, merge_lora=merge_lora)
