"""A selector registered from inside this file (one class, its name in the config) runs through a
training step (as the distillation teacher and the pre-selector) and through eval."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medvlm3d.config import load_config
from medvlm3d.data.readers import write_manifest
from medvlm3d.data.select import SELECTORS, SliceSelection
from medvlm3d.train.recipe import run_training

CALLS: list[int] = []


@SELECTORS.register("toy_last")
class LastSlices:
    """Keeps the last num_picks real slices; the teacher is all on the last one (+ eps)."""

    def __init__(self, cfg: object, num_picks: int) -> None:
        self.num_picks = num_picks

    def __call__(self, slices, plane, mask=None, index=0, slice_target=None) -> SliceSelection:
        CALLS.append(int(slices.shape[0]))
        s = int(plane.shape[0])
        m = torch.ones(s, dtype=torch.bool) if mask is None else mask.bool()
        real = m.nonzero().flatten()
        teacher = 0.1 * m.float() / m.sum()
        teacher[real[-1]] += 0.9
        return SliceSelection(teacher=teacher, keep=real[-self.num_picks:])


@pytest.fixture(autouse=True)
def fresh_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_toy_selector_trains_and_evaluates(tmp_path: Path, phantom_records: list[dict], tiny_tokenizer_dir: Path) -> None:
    from medvlm3d import load_pretrained
    from medvlm3d.eval.runner import evaluate

    manifest = write_manifest(phantom_records[:4], tmp_path / "four.jsonl")
    cfg = load_config("tiny", [f"model.llm.tokenizer={tiny_tokenizer_dir}", f"data.train={manifest}",
                               f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.distill_weight=0.5",
                               "data.allow_outside_root=true",
                               "model.vote_mi.selector=toy_last", "model.preselect_k=6", "model.preselector=toy_last"],
                      layers=["stage2_finetune"])
    CALLS.clear()
    final = run_training(cfg)
    assert CALLS and set(CALLS) == {16, 6}  # pre-selection on 16 slices, then the teacher on the 6 kept
    metrics = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "distill" in line]
    assert metrics, "the toy teacher must reach the distillation term"
    CALLS.clear()
    model = load_pretrained(str(final))
    assert model.cfg.model.preselector == "toy_last"  # the name travels in the checkpoint's config
    res = evaluate(model, phantom_records[:3], "vqa_closed", progress=False, meteor=False, coco_tokenizer="simple")
    assert res["n"] > 0 and 16 in CALLS  # eval pre-selects with the toy too
