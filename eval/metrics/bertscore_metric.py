"""BERTScore through the `bert-score` package, from a local model folder only (never a hub).

    bertscore(preds, refs, model_dir, layer=None, batch_size=64, device="cpu", idf=False,
              rescale_with_baseline=False) -> {"precision", "recall", "f1"}: [N] per-sample lists
    bertscore_layer(model_dir, layer=None) -> int: `layer`, else bert_score's table (model2layers)
        for the model the folder holds (its folder name or config `_name_or_path`, e.g.
        "roberta-large" -> 17), else ConfigError asking for eval.bertscore_layers
Registered "bertscore" (options bertscore_model, bertscore_layers, bertscore_rescale):
    -> {"bertscore": {"precision", "recall", "f1" (means over samples), "model", "layer"}}
    -> {"bertscore": BERTSCORE_SKIP} when no folder is given (a note in the output, never a 0)

This is `bert_score.score(cands, refs, model_type=<folder>, num_layers=<layer>, idf=False,
rescale_with_baseline=False)`, i.e. HF evaluate's `bertscore` with lang="en" when the folder
holds roberta-large (layer 17, no idf, no baseline rescaling unless asked; the baseline file is
bert-score's own rescale_baseline/en/<model>.tsv).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medvlm3d.data.errors import ConfigError

from .base import METRICS, _pairs

BERTSCORE_SKIP = "skipped: set eval.bertscore_model to a local roberta-large folder"


def _model_name(path: Path) -> str | None:
    """The bert_score table name of the model in `path` (folder name, else config `_name_or_path`)."""
    from bert_score.utils import model2layers

    if path.name in model2layers:
        return path.name
    try:
        name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path") or ""
    except (OSError, ValueError):
        return None
    name = Path(str(name)).name
    return name if name in model2layers else None


def bertscore_layer(model_dir: str | os.PathLike[str], layer: int | None = None) -> int:
    """The hidden layer BERTScore reads (see the module docstring)."""
    if layer is not None:
        if int(layer) < 0:
            raise ConfigError(f"eval.bertscore_layers must be >= 0, got {layer}")
        return int(layer)
    from bert_score.utils import model2layers

    name = _model_name(Path(model_dir))
    if name is None:
        raise ConfigError(f"eval.bertscore_layers: the model in {str(model_dir)!r} is not in bert_score's layer table "
                          "(a folder named e.g. 'roberta-large', or its config's _name_or_path); set the layer")
    return int(model2layers[name])


def bertscore(predictions: Sequence[str], references: Sequence[str], model_dir: str | os.PathLike[str],
              layer: int | None = None, batch_size: int = 64, device: str = "cpu", idf: bool = False,
              rescale_with_baseline: bool = False) -> dict[str, list[float]]:
    """Per-sample BERTScore P/R/F1 = bert_score.score with the folder as model_type."""
    preds, refs = _pairs(predictions, references)
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"BERTScore model folder {str(path)!r} does not exist (a local HF model folder is needed)")
    num_layers = bertscore_layer(path, layer)
    baseline = None
    if rescale_with_baseline:
        import bert_score

        name = _model_name(path)
        baseline = Path(bert_score.__file__).parent / "rescale_baseline" / "en" / f"{name}.tsv"
        if name is None or not baseline.is_file():
            raise ConfigError(f"eval.bertscore_rescale: bert-score ships no English baseline for {str(path)!r}")
    from bert_score import score

    p, r, f = score(preds, refs, model_type=str(path), num_layers=num_layers, idf=idf, batch_size=batch_size,
                    device=device, lang="en", rescale_with_baseline=rescale_with_baseline,
                    baseline_path=None if baseline is None else str(baseline))
    return {"precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist()}


@METRICS.register("bertscore")
def bertscore_metric(preds: list[str], refs: list[str], records: list[dict[str, Any]], *,
                     bertscore_model: str | None = None, bertscore_layers: int | None = None,
                     bertscore_rescale: bool = False, device: str = "cpu", **options: Any) -> dict[str, Any]:
    """BERTScore means over samples under "bertscore", or the skip note without a model folder."""
    if not bertscore_model:
        return {"bertscore": BERTSCORE_SKIP}
    layer = bertscore_layer(bertscore_model, bertscore_layers)
    s = bertscore(preds, refs, bertscore_model, layer, device=device, rescale_with_baseline=bertscore_rescale)
    return {"bertscore": {**{k: float(np.mean(v)) for k, v in s.items()}, "model": str(bertscore_model),
                          "layer": layer}}
