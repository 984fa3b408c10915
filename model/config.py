"""`ModelConfig`: the model section of a run config, composing each component's own config.

Each field's dataclass lives in its component module (Encoder3DConfig in model/encoder3d.py,
TGISConfig in model/tgis.py, ...); this file only nests them under `model:`. It is a module of
its own (not model/medvlm.py) because `medvlm3d.config` imports it to build `RunConfig`: it
must not import `medvlm3d.config` back, and it stays free of the composite model's imports
(generation, data collation, feature cache), which would widen that cycle's surface.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medvlm3d.config_fields import check_choice
from medvlm3d.data.errors import ConfigError
from medvlm3d.model.encoder3d import Encoder3DConfig
from medvlm3d.model.inter_slice import InterSliceConfig
from medvlm3d.model.llm import LLMConfig
from medvlm3d.model.projector import ProjectorConfig
from medvlm3d.model.slice_encoder import SliceEncoderConfig
from medvlm3d.model.tgis import TGISConfig
from medvlm3d.model.trainable import TrainablePolicy
from medvlm3d.data.select.base import VoteMIConfig

VARIANTS = ("2e3", "2e3_interslice", "3d_only", "2d_only", "2d_interslice")


@dataclass
class ModelConfig:
    variant: str = "2e3"
    encoder3d: Encoder3DConfig = field(default_factory=Encoder3DConfig)
    slice_encoder: SliceEncoderConfig = field(default_factory=SliceEncoderConfig)
    inter_slice: InterSliceConfig = field(default_factory=InterSliceConfig)
    tgis: TGISConfig = field(default_factory=TGISConfig)
    vote_mi: VoteMIConfig = field(default_factory=VoteMIConfig)
    # pre-selection: `preselector` picks preselect_k of each image's slices on the data side, before
    # the slice encoder, which then sees only those (0 = off; the 3D branch still sees the volume)
    preselect_k: int = 0
    preselector: str = "votek"
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    trainable: TrainablePolicy = field(default_factory=TrainablePolicy)

    def __post_init__(self) -> None:
        check_choice("model.variant", self.variant, VARIANTS)
        if self.preselect_k < 0:
            raise ConfigError(f"model.preselect_k must be >= 0 (0 = off), got {self.preselect_k}")
