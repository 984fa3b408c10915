"""`TrainConfig`: the `train:` section of a run config (optimiser, schedule, loss weights, I/O).

A module of its own, not train/loop.py: `medvlm3d.config` imports it to build `RunConfig`, and
the loop imports the training stack (train/data.py, checkpointing) that reads `medvlm3d.config`
back. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from medvlm3d.config_fields import check_choice
from medvlm3d.data.errors import ConfigError



@dataclass
class TrainConfig:
    stage: str = "stage2_finetune"  # stage0_text | stage0_clip | stage1_align | stage2_finetune
    init_from: str = ""  # checkpoint folder of the previous stage
    output_dir: str = "runs/demo"
    seed: int = 0
    max_steps: int = 100
    # > 0: max_steps = ceil(epochs * records / global batch), set once the dataset is read (schedule_steps)
    epochs: float = 0.0
    batch_size: int = 4  # per process
    grad_accum: int = 1
    # > 0: grad_accum = global_batch / (batch_size * processes), which must divide (schedule_steps)
    global_batch: int = 0
    lr: float = 1e-3
    lr_per_component: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    warmup_steps: int = 10
    warmup_ratio: float = 0.0  # > 0: warmup_steps = ceil(warmup_ratio * max_steps), as HF's warmup_ratio
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    distill_weight: float = 0.0  # lambda for KL(VoteMI teacher || TG-IS scores)
    distill_schedule: str = "constant"  # constant | linear_decay
    slice_loss_weight: float = 0.0
    contrastive_temperature: float = 0.07
    contrastive_pool: str = "mean"  # mean | max: how stage0_clip pools tokens (and slices) per image
    save_every: int = 0
    keep_last: int = 2
    log_every: int = 10
    resume: str = ""  # "" | auto | a checkpoint folder
    nan_abort_after: int = 5
    feature_cache_mb: int = 0  # > 0: memoise frozen encoders' outputs up to this many MB (off under ZeRO-3)
    # batches of samples of about one text length (train/data.py EpochSampler): less padding, but
    # on the demo it cost closed-VQA 0.876 -> 0.576 (a batch then holds one kind of question; README)
    group_by_length: bool = False

    def __post_init__(self) -> None:
        from medvlm3d.train.stages import STAGES  # the registered stages (train/stages/, plugins); not at import: cycle

        check_choice("train.stage", self.stage, tuple(STAGES.names()))
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        check_choice("train.distill_schedule", self.distill_schedule, ("constant", "linear_decay"))
        check_choice("train.contrastive_pool", self.contrastive_pool, ("mean", "max"))
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.epochs < 0 or self.global_batch < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.epochs and train.global_batch must be >= 0 and train.warmup_ratio in [0, 1), "
                              f"got {self.epochs}, {self.global_batch}, {self.warmup_ratio}")
        if self.feature_cache_mb < 0:
            raise ConfigError(f"train.feature_cache_mb must be >= 0 (0 = off), got {self.feature_cache_mb}")


def schedule_steps(t: TrainConfig, num_records: int, num_processes: int) -> tuple[int, int, int]:
    """(grad_accum, max_steps, warmup_steps) once the dataset size and process count are known.

    `global_batch` > 0 fixes grad_accum = global_batch / (batch_size * num_processes) (a ConfigError
    unless it divides); `epochs` > 0 gives max_steps = ceil(epochs * num_records / global batch),
    as HF Trainer's num_train_epochs (optimizer steps); `warmup_ratio` > 0 gives warmup_steps =
    ceil(warmup_ratio * max_steps). Each left at 0 keeps the configured value.
    """
    accum = t.grad_accum
    if t.global_batch > 0:
        per_step = t.batch_size * num_processes
        if t.global_batch % per_step:
            raise ConfigError(f"train.global_batch {t.global_batch} is not a multiple of train.batch_size "
                              f"{t.batch_size} x {num_processes} processes")
        accum = t.global_batch // per_step
    steps = t.max_steps
    if t.epochs > 0:
        steps = max(1, math.ceil(t.epochs * num_records / (t.batch_size * num_processes * accum)))
    warmup = math.ceil(t.warmup_ratio * steps) if t.warmup_ratio > 0 else t.warmup_steps
    return accum, steps, warmup
