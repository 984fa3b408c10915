"""The training recipe: one Accelerate code path for 1 CPU, N processes, multi-GPU and DeepSpeed.

    run_training(cfg: RunConfig) -> Path     the exported model folder <train.output_dir>/final
    medvlm3d train --config <yaml|name> [--stage <yaml|name>] [key=value ...]
    accelerate launch --config_file configs/accelerate/<x>.yaml -m medvlm3d.train --config ...

A stage is a config (`train.stage`, see train/loop.py for the objectives); it starts from
`train.init_from` (a previous stage's exported folder, through `init_from_checkpoint`) or from
scratch (`build_model`). Batches: `train.batch_size` per process, so a step sees
batch_size × processes × grad_accum samples. The run folder (`train.output_dir`) holds:

    config.yaml                 the run config
    metrics.jsonl               one JSON line per logged step: every loss term, lr, samples/s, step
    tensorboard/                TensorBoard events (accelerator.log)
    checkpoints/step-NNNNNN/    trainer_state/ (accelerator.save_state), model/ (save_pretrained),
                                progress.json (step, samples, per-step loss history), COMPLETE
    final/                      the exported model of the last step (save_pretrained layout)

`train.resume`: "auto" continues from the newest complete checkpoint (or starts fresh when there
is none), a path continues from that checkpoint: accelerator.load_state restores the model,
optimizer, scheduler and RNG states, and the consumed batches of the current epoch are skipped
without being loaded; on CPU the per-step losses then equal an uninterrupted run's exactly.
A fresh start refuses a run folder that already holds checkpoints, and a run folder is used by
one run at a time: an exclusive lock on `<output_dir>/.lock` (train/runfolder.py), released at
exit and by the kernel when a run is killed.

Data (train/data.py): the records are not all loaded up front (that is a full pass over every
volume); a bad record raises a DataError naming it when its batch comes, and the run can resume
from its last checkpoint. With `data.skip_bad_records`, every record is loaded once before
training and the bad ones are dropped and counted in the log.

Accelerator: gradient accumulation (not synced to epoch ends, a step always has grad_accum
micro-batches), mixed precision from `train.mixed_precision` (or, when that is "no", from
`accelerate launch`), TensorBoard logging, the gloo process group on CPU, DDP with
find_unused_parameters. DeepSpeed comes from the accelerate config; its "auto" fields are filled
by Accelerate, and gradient_clipping by `train.max_grad_norm`. Under ZeRO-3 the export gathers
the full 16-bit weights (accelerator.get_state_dict; needs stage3_gather_16bit_weights_on_model_save).
The process group is destroyed at the end, so multi-process runs exit cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from medvlm3d.config import RunConfig, load_config, save_config, to_dict
from medvlm3d.train.config import schedule_steps
from medvlm3d.train.checkpointing import MARKER, complete_checkpoints, latest_complete, read_progress
from medvlm3d.train.loop import (Loop, Progress, TrainingDiverged, TrainingStopped, checkpoint_writer, exported,
                                 lm_loss_function, stage_module)
from medvlm3d.train.runfolder import lock_run_folder, reset_metrics
from medvlm3d.train.stages import get_stage

log = logging.getLogger(__name__)

EXIT_DIVERGED = 3


# ------------------------------------------------------------------------------------------------
# accelerator


def launched_distributed() -> bool:
    """True under torchrun / accelerate launch / deepspeed (a process group is to be made)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _has_device() -> bool:
    accel = getattr(torch, "accelerator", None)
    return bool(accel.is_available()) if accel is not None else torch.cuda.is_available()


def make_accelerator(cfg: RunConfig, run_dir: Path) -> Any:
    """The Accelerator of a run (see the module docstring).

    CPU traps (../shared/ENVIRONMENT.md): several processes on CPU need the gloo process group,
    and plain DDP needs `cpu=True`, without which Accelerate leaves the distributed type at NO
    (no DDP wrapper, no gradient sync, reduce() a no-op: each process trains its own copy). Under
    DeepSpeed `cpu=True` must stay off, since it silently drops DeepSpeed.
    """
    from accelerate import Accelerator
    from accelerate.utils import (DistributedDataParallelKwargs, GradientAccumulationPlugin,
                                  InitProcessGroupKwargs, ProjectConfiguration)

    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    multi_cpu = launched_distributed() and not _has_device()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if multi_cpu:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=multi_cpu and not deepspeed,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.train.grad_accum, sync_with_dataloader=False),
        mixed_precision=None if cfg.train.mixed_precision == "no" else cfg.train.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        kwargs_handlers=handlers,
        step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, whatever the process count
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type.value == "NO":
        raise RuntimeError(
            f"{accelerator.num_processes} processes but Accelerate chose no distributed mode: the processes would "
            "train independent copies. Launch with a configs/accelerate/*.yaml (MULTI_GPU or DEEPSPEED)"
        )
    log.info("accelerator: %s, %d process(es), device %s, mixed precision %s", accelerator.distributed_type.value,
             accelerator.num_processes, accelerator.device, accelerator.mixed_precision)
    return accelerator


def _deepspeed_config(accelerator: Any) -> dict[str, Any] | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.deepspeed_config if plugin is not None else None


@contextlib.contextmanager
def whole_model_init(accelerator: Any) -> Iterator[None]:
    """Build models whole on every rank, also under ZeRO-3.

    Accelerate registers its DeepSpeed config with transformers whatever `zero3_init_flag` says,
    and transformers then builds (and randomly initialises) the LLM inside `deepspeed.zero.Init`,
    partitioned: the ranks get different initial weights than a single process with the same
    seed, and MedVLM's construction sees partitioned tensors. The model is instead built whole
    (as a single process would) and partitioned by `deepspeed.initialize` in `prepare`.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if getattr(plugin, "dschf", None) is not None:
            set_hf_deepspeed_config(plugin.dschf)


def _is_zero3(accelerator: Any) -> bool:
    ds = _deepspeed_config(accelerator)
    return bool(ds) and int(ds.get("zero_optimization", {}).get("stage", 0)) == 3


def _flat_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as flat scalar hparams for TensorBoard."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, (int, float, str, bool)):
            out[prefix] = node
        else:
            out[prefix] = json.dumps(node)

    walk("", to_dict(cfg))
    return out


# ------------------------------------------------------------------------------------------------
# model, optimizer


def build_stage_model(cfg: RunConfig) -> tuple[nn.Module, nn.Module]:
    """(stage module, the MedVLM inside it), from train.init_from or from scratch."""
    from medvlm3d.model.checkpoint import init_from_checkpoint
    from medvlm3d.model.medvlm import build_model

    if cfg.train.init_from:
        log.info("stage %s starts from %s", cfg.train.stage, cfg.train.init_from)
        vlm = init_from_checkpoint(cfg, cfg.train.init_from)
    else:
        log.info("stage %s starts from scratch", cfg.train.stage)
        vlm = build_model(cfg)
    if cfg.data.features and get_stage(cfg.train.stage).runs_vlm:  # the frozen encoders' outputs, from disk
        log.info("data.features %s: %s", cfg.data.features, ", ".join(vlm.use_features(cfg.data.features)))
    return stage_module(vlm, cfg), vlm


def param_groups(module: nn.Module, vlm: nn.Module, cfg: RunConfig) -> list[dict[str, Any]]:
    """AdamW groups per component (trainable_parameter_groups); a stage module's own trainable
    parameters outside the MedVLM (e.g. a contrastive text tower) form the component "head"."""
    from medvlm3d.model.trainable import trainable_parameter_groups

    components: dict[str, nn.Module | None] = dict(vlm.components())
    if module is not vlm:
        head = nn.Module()
        for name, child in module.named_children():
            if child is not vlm:
                head.add_module(name, child)
        for name, p in module.named_parameters(recurse=False):
            head.register_parameter(name, p)
        if any(p.requires_grad for p in head.parameters()):
            components["head"] = head
    t = cfg.train
    return trainable_parameter_groups(components, t.lr, t.lr_per_component, t.weight_decay)


@contextlib.contextmanager
def _full_weights(module: nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give the (ZeRO-3 partitioned) parameters of `module` their gathered values."""
    saved = {}
    try:
        for name, p in module.named_parameters():
            if name in state:
                saved[name] = (p, p.data)
                p.data = state[name]
        yield
    finally:
        for p, data in saved.values():
            p.data = data


def exporter(accelerator: Any, model: nn.Module) -> Any:
    """export(path): save_pretrained of the MedVLM (gathered under ZeRO-3; collective)."""
    from medvlm3d.model.checkpoint import save_pretrained

    def export(path: Path) -> None:
        unwrapped = accelerator.unwrap_model(model)
        if _is_zero3(accelerator):
            state = accelerator.get_state_dict(model)  # every rank takes part; full weights on rank 0
            if accelerator.is_main_process:
                with _full_weights(unwrapped, state), whole_model_init(accelerator):
                    save_pretrained(exported(unwrapped), path)
        elif accelerator.is_main_process:
            save_pretrained(exported(unwrapped), path)
        accelerator.wait_for_everyone()

    return export


# ------------------------------------------------------------------------------------------------
# resume


def resume_checkpoint(cfg: RunConfig, run_dir: Path) -> Path | None:
    """The checkpoint to continue from (train.resume), or None for a fresh start."""
    resume = cfg.train.resume
    if resume == "auto":
        ckpt = latest_complete(run_dir)
        log.info("train.resume=auto: %s", f"continuing from {ckpt}" if ckpt else "no checkpoint yet, starting fresh")
        return ckpt
    if resume:
        ckpt = Path(resume)
        if not (ckpt / MARKER).is_file() or not (ckpt / "trainer_state").is_dir():
            raise ValueError(f"train.resume={resume!r} is not a complete checkpoint folder "
                             f"(expected trainer_state/ and {MARKER} inside, as in {run_dir}/checkpoints/step-*)")
        return ckpt
    done = complete_checkpoints(run_dir)
    if done:
        raise ValueError(f"train.output_dir {str(run_dir)!r} already holds checkpoints (latest {done[-1].name}); "
                         "set train.resume=auto to continue that run, or choose a new train.output_dir")
    return None


def _copy_atomic(src: Path, dst: Path) -> None:
    from medvlm3d.io import atomic_dir

    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------------
# the run


def run_training(cfg: RunConfig) -> Path:
    """Train one stage as `cfg` says; returns `<train.output_dir>/final`. Raises TrainingDiverged
    after `train.nan_abort_after` non-finite steps in a row, TrainingStopped (a KeyboardInterrupt,
    `.checkpoint` = the model folder it saved) after SIGTERM/SIGINT, and RunFolderBusy (a
    ConfigError) when another run holds the run folder."""
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    from medvlm3d.train.data import build_train_data, make_loader

    if not isinstance(cfg, RunConfig):
        raise ValueError(f"run_training expects a RunConfig (medvlm3d.load_config(...)), got {type(cfg).__name__}")
    t = cfg.train
    if t.max_steps < 1:
        raise ValueError(f"train.max_steps must be >= 1, got {t.max_steps}")
    run_dir = Path(t.output_dir).expanduser().resolve()
    if t.global_batch > 0:  # a paper's global batch, whatever the process count (train/config.py)
        from accelerate import PartialState

        t.grad_accum = schedule_steps(t, 0, PartialState().num_processes)[0]
    accelerator = make_accelerator(cfg, run_dir)
    lock = None
    try:
        if accelerator.is_main_process:
            lock = lock_run_folder(run_dir)  # one run per folder (train/runfolder.py)
        else:
            logging.getLogger("medvlm3d").setLevel(logging.WARNING)
        stage = get_stage(t.stage)
        ckpt = resume_checkpoint(cfg, run_dir)
        set_seed(t.seed)
        if cfg.data.features and _is_zero3(accelerator):
            from medvlm3d.data.errors import ConfigError

            raise ConfigError("data.features cannot be used under ZeRO-3: every rank must run each partitioned encoder")
        with whole_model_init(accelerator):
            module, vlm = build_stage_model(cfg)
        if t.feature_cache_mb > 0 and stage.runs_vlm:  # stage 0 calls encoders itself
            if _is_zero3(accelerator):
                log.warning("train.feature_cache_mb is ignored under ZeRO-3: every rank must run each partitioned encoder")
            else:
                cached = vlm.enable_feature_cache(t.feature_cache_mb << 20)
                log.info("feature cache (%d MB): %s", t.feature_cache_mb, ", ".join(cached) or "no frozen encoder")
        if stage.runs_vlm and (t.distill_weight > 0 or t.slice_loss_weight > 0) \
                and getattr(vlm, "tgis", None) is None:
            log.warning("model.variant=%s has no TG-IS head: train.distill_weight and train.slice_loss_weight "
                        "have no effect", cfg.model.variant)
        elif t.distill_weight > 0 and cfg.model.vote_mi.teacher == "off":
            log.warning("train.distill_weight=%s but model.vote_mi.teacher=off: no distillation term", t.distill_weight)
        dataset, collate = build_train_data(cfg, vlm.tokenizer, vlm.num_visual_tokens)
        if t.epochs > 0 or t.warmup_ratio > 0:  # epochs / warmup_ratio -> steps (train/config.py)
            _, t.max_steps, t.warmup_steps = schedule_steps(t, len(dataset), accelerator.num_processes)
        loader, sampler = make_loader(dataset, collate, cfg, accelerator.num_processes)
        optimizer = torch.optim.AdamW(param_groups(module, vlm, cfg), lr=t.lr)
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(t.warmup_steps, t.max_steps), t.max_steps)
        ds = _deepspeed_config(accelerator)
        if ds is not None and ds.get("gradient_clipping") == "auto":
            ds["gradient_clipping"] = float(max(0.0, t.max_grad_norm))
        lm_loss = lm_loss_function(vlm.llm)
        model, optimizer, loader, scheduler = accelerator.prepare(module, optimizer, loader, scheduler)

        progress = Progress(layout=dict(processes=accelerator.num_processes, batch_size=t.batch_size,
                                        grad_accum=t.grad_accum))
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        if ckpt is not None:
            accelerator.load_state(str(ckpt / "trainer_state"))
            saved = read_progress(ckpt)
            if saved.get("layout", progress.layout) != progress.layout:
                log.warning("resuming a run made with %s under %s: the data position is counted in this run's "
                            "batches, so the sample order differs from an uninterrupted run", saved["layout"],
                            progress.layout)
            progress.step, progress.samples = int(saved["step"]), int(saved["samples"])
            progress.loss_history = list(saved.get("loss_history", []))[: progress.step]
            progress.nan_skipped = int(saved.get("nan_skipped", 0))
            log.info("resumed from %s at step %d", ckpt, progress.step)
        if accelerator.is_main_process:  # the rows of steps after the checkpoint go (atomically)
            reset_metrics(run_dir / "metrics.jsonl", progress.step if ckpt is not None else 0)
        accelerator.init_trackers("tensorboard", config=_flat_config(cfg))
        accelerator.wait_for_everyone()

        export = exporter(accelerator, model)
        save = checkpoint_writer(accelerator, run_dir, cfg, export)
        loop = Loop(accelerator, model, optimizer, scheduler, loader, sampler, cfg, run_dir, progress, save, lm_loss)
        status = loop.run()
        last = run_dir / "checkpoints" / f"step-{progress.step:06d}" / "model"
        if status == "stopped":
            raise TrainingStopped(
                f"stopped on a signal after step {progress.step} of {t.max_steps}; checkpoint {last.parent}. "
                f"Continue with train.resume=auto (train.output_dir={run_dir})", checkpoint=last)
        final = run_dir / "final"
        if accelerator.is_main_process:
            _copy_atomic(last, final)
            log.info("exported %s", final)
        accelerator.wait_for_everyone()
        return final
    finally:
        try:
            teardown(accelerator)
        finally:
            if lock is not None:
                lock.release()


def teardown(accelerator: Any) -> None:
    """Close the trackers and destroy the process group (Accelerate's end_training does both; the
    group is destroyed here too when it did not). No barrier: after an error a peer may be gone."""
    try:
        accelerator.end_training()
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
