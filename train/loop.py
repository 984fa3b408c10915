"""The training loop shared by every stage: objectives, steps, logging, checkpoints, faults.

Objectives: the registered stage `train.stage` (train/stages/, one file each) gives, per
micro-batch of a process, `(loss, terms)` with `loss` the sum of its weighted terms (e.g.
lm + distill + slice for stage1_align/stage2_finetune); the loop backpropagates `loss` and logs
each term and `loss` divided by `scale` (below), so the logged sum is the backpropagated one.

The LM term is normalised by the number of supervised tokens of the whole optimizer step (all
micro-batches of all processes, counted with one all-reduce), through the LLM's own
`loss_function(..., num_items_in_batch=...)`: a step over P processes × A accumulation steps
then gives exactly the gradient of one batch of the same P·A micro-batches (the token-weighted
mean), not a mean of per-process means. The other terms are means over images; equal image
counts per process make their averaged gradient exact too.

Each step all-reduces one vector of [term contributions..., non-finite flag, stop flag]: the
logged terms are global, and every rank takes the same decision to skip a non-finite step or to
stop on a signal. A skipped step makes no optimizer or scheduler update (under DeepSpeed, whose
update happens inside the boundary backward, the check runs before each backward); after
`train.nan_abort_after` skipped steps in a row the loop saves a checkpoint (weights of the last
good step) and raises `TrainingDiverged`. SIGTERM/SIGINT set a flag: the loop saves a checkpoint
at the next step boundary and returns.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from medvlm3d.config import RunConfig
from medvlm3d.data.prompts import IGNORE_INDEX
from medvlm3d.train.checkpointing import write_checkpoint
from medvlm3d.train.data import epoch_seed, set_sample_draws
from medvlm3d.train.losses import distill_weight
from medvlm3d.train.stages import LossContext, get_stage

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised after `train.nan_abort_after` non-finite steps in a row (a checkpoint was saved)."""


class TrainingStopped(KeyboardInterrupt):
    """Raised by run_training after SIGTERM/SIGINT: the current step finished and a checkpoint
    was saved; `.checkpoint` is its model folder. A KeyboardInterrupt, so whatever runs stages in
    a chain (the demo) stops too, and the CLI exits 130 with the message."""

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


# ------------------------------------------------------------------------------------------------
# stage modules and objectives


def stage_module(vlm: nn.Module, cfg: RunConfig) -> nn.Module:
    """The module the stage `cfg.train.stage` trains (train/stages/)."""
    return get_stage(cfg.train.stage).module(vlm, cfg)


def exported(module: nn.Module) -> nn.Module:
    """The MedVLM inside a stage module."""
    return getattr(module, "vlm", module)


def lm_loss_function(llm: nn.Module) -> Callable[..., torch.Tensor]:
    """The HF causal LM's own loss (`ForCausalLMLoss` for Llama/Qwen2/Phi-3), PEFT-wrapped or not."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    return base.loss_function


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Tokens the causal LM loss counts: labels after the one-position shift that are not -100."""
    labels = batch.get("labels")
    return 0 if labels is None else int((labels[..., 1:] != IGNORE_INDEX).sum())


def micro_batch_loss(
    model: nn.Module,
    batch: dict[str, Any],
    cfg: RunConfig,
    step: int,
    lm_loss: Callable[..., torch.Tensor],
    n_tokens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss to backward, {term: this micro-batch's share of the step's global value}).

    `n_tokens`: supervised tokens of the whole step (all processes and micro-batches); `scale`:
    processes × accumulation steps, undoing the averaging that DDP/DeepSpeed and
    `accelerator.backward` apply, so that the LM gradient is that of the global token mean.
    """
    stage = get_stage(cfg.train.stage)
    loss, terms = stage.loss(model, batch, LossContext(cfg, step, lm_loss, n_tokens, scale))
    logged = {k: v.detach().float() / scale for k, v in terms.items()}
    logged["loss"] = loss.detach().float() / scale
    return loss, logged


# ------------------------------------------------------------------------------------------------
# signals


class StopFlag:
    """SIGTERM/SIGINT set `.requested` (a second signal ends the process the default way)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.requested = True
        log.warning("received %s: saving a checkpoint at the next step boundary, then stopping",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------
# the loop


@dataclass
class Progress:
    """What progress.json holds: steps done, samples seen, per-step total loss (None = skipped)."""

    step: int = 0
    samples: int = 0
    loss_history: list[float | None] = field(default_factory=list)
    nan_skipped: int = 0
    layout: dict[str, int] = field(default_factory=dict)  # processes, batch_size, grad_accum

    def to_dict(self) -> dict[str, Any]:
        return dict(step=self.step, samples=self.samples, loss_history=self.loss_history,
                    nan_skipped=self.nan_skipped, layout=self.layout)


class Loop:
    """Runs optimizer steps from `progress.step` to `train.max_steps` (see the module docstring).

    `save(step_progress)` writes a checkpoint (collective); it is called every `train.save_every`
    steps, on a stop request, before a divergence abort, and at the end.
    """

    def __init__(self, accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, loader: Any,
                 sampler: Any, cfg: RunConfig, run_dir: Path, progress: Progress,
                 save: Callable[[Progress], None], lm_loss: Callable[..., torch.Tensor]) -> None:
        self.acc, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.loader, self.sampler, self.cfg, self.run_dir = loader, sampler, cfg, Path(run_dir)
        self.progress, self.save, self.lm_loss = progress, save, lm_loss
        self.deepspeed = accelerator.distributed_type.value == "DEEPSPEED"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.last_data_s = 0.0

    # data ------------------------------------------------------------------------------------
    def micro_batches(self) -> Iterator[dict[str, Any]]:
        """Endless per-process micro-batches, resuming after the ones already consumed (skipped
        with accelerate's skip_first_batches, so they are never loaded)."""
        per_epoch = len(self.loader)
        if per_epoch == 0:
            raise ValueError("the training data gives no full global batch: lower train.batch_size or add data")
        epoch, skip = divmod(self.progress.step * self.cfg.train.grad_accum, per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.loader.set_epoch(epoch)
            set_sample_draws(self.loader, self.cfg.train.seed, epoch)  # per-sample randomness
            dl = self.acc.skip_first_batches(self.loader, skip) if skip else self.loader
            if skip:
                dl.set_epoch(epoch)
            if getattr(dl, "generator", None) is not None:
                dl.generator.manual_seed(epoch_seed(self.cfg.train.seed, epoch))
            yield from dl
            epoch, skip = epoch + 1, 0

    # one step --------------------------------------------------------------------------------
    def _reduce(self, values: list[float | torch.Tensor]) -> torch.Tensor:
        vec = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in values]).to(self.acc.device)
        return self.acc.reduce(vec, reduction="sum") if self.acc.num_processes > 1 else vec

    def step(self, batches: Iterator[dict[str, Any]], stop: StopFlag) -> tuple[dict[str, float], bool, bool]:
        """One optimizer step -> (global terms, skipped, stop requested)."""
        t, acc = self.cfg.train, self.acc
        s = self.progress.step
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(t.grad_accum)]
        self.last_data_s = time.perf_counter() - t0  # time spent waiting for the loader
        n_tokens = self._reduce([float(sum(supervised_tokens(b) for b in micro))])[0].float()
        scale = float(acc.num_processes * t.grad_accum)
        totals: dict[str, torch.Tensor] = {}
        bad_local, backward_off = 0.0, False
        for b in micro:
            with acc.accumulate(self.model):
                loss, terms = micro_batch_loss(self.model, b, self.cfg, s, self.lm_loss, n_tokens, scale)
                finite = bool(torch.isfinite(loss.detach()).all())
                bad_local += 0.0 if finite else 1.0
                if self.deepspeed and not backward_off:
                    # DeepSpeed steps inside the boundary backward: agree before each backward.
                    backward_off = bool(self._reduce([0.0 if finite else 1.0])[0] > 0)
                if not backward_off:
                    acc.backward(loss)
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().double().cpu()
        names = sorted(totals)
        vec = self._reduce([totals[k] for k in names] + [bad_local, 1.0 if stop.requested else 0.0])
        glob = {k: float(vec[i]) for i, k in enumerate(names)}
        if "distill" in glob:
            glob["lambda"] = distill_weight(s, t.max_steps, t.distill_weight, t.distill_schedule)
        bad = float(vec[-2]) > 0 or not all(math.isfinite(v) for v in glob.values())
        grad_norm = None
        if self.deepspeed:
            # The engine already stepped (or, with backward_off, did not) inside acc.backward.
            bad = backward_off
            if bad and t.grad_accum > 1:
                log.warning("DeepSpeed: the gradients of this step's earlier micro-batches stay accumulated "
                            "in the engine and join the next step")
            if not bad and t.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
        elif not bad:
            if t.max_grad_norm > 0:
                grad_norm = acc.clip_grad_norm_(self.params, t.max_grad_norm)
                if grad_norm is not None and not math.isfinite(float(grad_norm)) and acc.mixed_precision != "fp16":
                    bad = True  # the gradient overflowed though the loss did not (fp16: the scaler skips)
            if not bad:
                self.optimizer.step()
        if not bad and not self.optimizer.step_was_skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if grad_norm is not None and math.isfinite(float(grad_norm)):
            glob["grad_norm"] = float(grad_norm)
        return glob, bad, float(vec[-1]) > 0

    # the run ---------------------------------------------------------------------------------
    def _log(self, terms: dict[str, float], skipped: bool, rate: float, data_frac: float) -> None:
        p = self.progress
        row = {"step": p.step, **{k: v for k, v in terms.items()}, "lr": float(self.optimizer.param_groups[0]["lr"]),
               "samples": p.samples, "samples_per_s": rate, "data_wait_frac": data_frac, "skipped": skipped}
        self.acc.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=p.step)
        if self.acc.is_main_process:
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def run(self) -> str:
        """Train to max_steps -> "done"; or "stopped" after a signal (checkpoint saved)."""
        t, p, acc = self.cfg.train, self.progress, self.acc
        global_batch = t.batch_size * acc.num_processes * t.grad_accum
        log_every = max(1, t.log_every)
        bar = tqdm(total=t.max_steps, initial=p.step, desc=t.stage, disable=not acc.is_main_process,
                   dynamic_ncols=True)
        self.model.train()
        batches = self.micro_batches()
        in_a_row, last_saved, since = 0, p.step, time.perf_counter()
        with StopFlag() as stop:
            while p.step < t.max_steps:
                start = time.perf_counter()
                terms, skipped, stop_now = self.step(batches, stop)
                p.step += 1
                p.samples += global_batch
                took = max(1e-9, time.perf_counter() - start)
                rate, data_frac = global_batch / took, self.last_data_s / took
                p.loss_history.append(None if skipped else terms.get("loss"))
                if skipped:
                    p.nan_skipped += 1
                    in_a_row += 1
                    log.warning("step %d: non-finite loss or gradient %s; step skipped (%d in a row)",
                                p.step, terms, in_a_row)
                else:
                    in_a_row = 0
                if p.step % log_every == 0 or p.step == t.max_steps or skipped:
                    self._log(terms, skipped, rate, data_frac)
                bar.update(1)
                bar.set_postfix(loss=f"{terms.get('loss', float('nan')):.4f}",
                                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", sps=f"{rate:.1f}")
                if t.nan_abort_after > 0 and in_a_row >= t.nan_abort_after:
                    self.save(p)
                    bar.close()
                    raise TrainingDiverged(
                        f"{in_a_row} non-finite steps in a row (train.nan_abort_after={t.nan_abort_after}) at step "
                        f"{p.step}; saved the last good weights as checkpoint step-{p.step:06d} in {self.run_dir}. "
                        "Lower train.lr, check the data, or raise train.max_grad_norm clipping"
                    )
                if stop_now or (t.save_every > 0 and p.step % t.save_every == 0):
                    self.save(p)
                    last_saved = p.step
                if stop_now:
                    bar.close()
                    log.warning("stopped at step %d on a signal; continue with train.resume=auto", p.step)
                    return "stopped"
        bar.close()
        if last_saved != p.step or not (self.run_dir / "checkpoints" / f"step-{p.step:06d}").is_dir():
            self.save(p)
        log.info("trained %d steps in %.1fs", p.step, time.perf_counter() - since)
        return "done"


def checkpoint_writer(accelerator: Any, run_dir: Path, cfg: RunConfig,
                      export: Callable[[Path], None]) -> Callable[[Progress], None]:
    """save(progress): trainer_state/ (accelerator.save_state, all ranks) + model/ (export) +
    progress.json, atomically, keeping the last `train.keep_last`."""

    def write_contents(tmp: Path) -> None:
        accelerator.save_state(str(tmp / "trainer_state"))
        export(tmp / "model")

    def save(progress: Progress) -> None:
        write_checkpoint(run_dir, progress.step, progress.to_dict(), write_contents, cfg.train.keep_last,
                         is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone)

    return save
