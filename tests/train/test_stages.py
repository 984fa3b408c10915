"""The stage registry (train/stages/): names validated in the config, one class per new stage."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from medvlm3d import load_config
from medvlm3d.data.errors import ConfigError
from medvlm3d.train.stages import STAGES, LossContext, Stage, get_stage, summed


def test_shipped_stages_are_registered() -> None:
    assert STAGES.names() == ["stage0_clip", "stage0_text", "stage1_align", "stage2_finetune"]
    assert get_stage("stage1_align").runs_vlm and not get_stage("stage0_text").runs_vlm
    assert get_stage("stage2_finetune").name == "stage2_finetune"


def test_unknown_stage_is_a_config_error_listing_the_names() -> None:
    with pytest.raises(ConfigError, match="stage0_text.*stage2_finetune"):
        get_stage("stage3")
    with pytest.raises(ConfigError, match="train.stage.*stage1_align"):
        load_config("tiny", ["train.stage=stage3"])


def test_a_new_stage_is_one_class_and_its_name_in_the_config() -> None:
    @STAGES.register("toy_stage")
    class ToyStage(Stage):
        diagnostics = ("raw",)

        def loss(self, module: Any, batch: dict[str, Any], ctx: LossContext) -> tuple[torch.Tensor, dict]:
            x = batch["x"]
            terms = {"a": 2 * x.sum(), "b": x.square().sum(), "raw": x.mean().detach()}
            return summed(terms, self.diagnostics), terms

    try:
        cfg = load_config("tiny", ["train.stage=toy_stage"])
        stage = get_stage(cfg.train.stage)
        assert isinstance(stage, ToyStage)
        loss, terms = stage.loss(None, {"x": torch.tensor([1.0, 2.0])}, LossContext(cfg, 0, None, torch.tensor(1), 1.0))
        assert loss.item() == 11.0 and set(stage.contributions(terms)) == {"a", "b"}
    finally:
        STAGES._builders.pop("toy_stage", None)
