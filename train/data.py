"""Training data for every stage: records, datasets, a deterministic epoch sampler, loaders.

    read_train_records(cfg) -> list[dict]          cfg.data.train via data.read_records_report
    TextDataset(records, tokenizer, max_len, task, vqa_mode, shuffle, context)[i] -> {input_ids, attention_mask, labels} [L]
    TextCollator(pad_token_id)(samples) -> {input_ids [B,L], attention_mask [B,L], labels [B,L] (-100 = pad)}
    TextCollator(pad_token_id, pack=True)(samples) -> {input_ids, labels, position_ids} [R,L], R <= B rows
    EpochSampler(n, seed[, lengths, group]): a permutation of range(n) that depends only on (seed, epoch),
        optionally grouped by length into global batches of `group`
    build_train_data(cfg, tokenizer, num_visual_tokens) -> (dataset, collate_fn)   the stage's own (train/stages/)
    study_data(cfg, records, tokenizer, num_visual_tokens) -> (StudyDataset, Collator)
    make_loader(dataset, collate_fn, cfg, processes=1) -> (DataLoader, EpochSampler)
        data.num_workers worker processes; pinned batches (data.pin_memory) when CUDA is present
    set_sample_draws(loader, seed, epoch)       seeds the dataset's per-sample draws for an epoch

Stages: `stage0_text` reads each record as plain LM text (the question and its target rendered by
the tokenizer's chat template without any image, every token supervised; with
`data.text_context: report` a VQA question comes after its study's report, in the place the image
takes in later stages: the LLM learns to answer from what precedes the question, as a pretrained
LLM answers from a given text, which stage 1 then teaches the projectors to feed); `stage0_clip` uses the
report records only, as `StudyDataset` samples (volumes, slices, report text); `stage1_align` and
`stage2_finetune` use every record as `StudyDataset` samples (data/collate.py gives the batch).

Order. `EpochSampler` draws `torch.randperm(n)` from a generator seeded by (train.seed, epoch),
so the order of epoch e is the same in every run, whatever the number of processes; Accelerate
then hands out consecutive batches to the processes in turn, so with P processes of batch B the
global batch of a step holds the same P*B samples as one process of batch P*B. The loader drops
the last incomplete batch (every optimizer step sees a full global batch), and nothing here
draws from the global RNG. The per-sample draws (choice shuffle, augmentation) come from a
generator seeded by (train.seed, epoch, sample index): `set_sample_draws(loader, seed, epoch)`,
called by the loop each epoch. The workers are persistent (started once per run, not per
epoch); the (seed, epoch) of the draws reaches them through a shared-memory tensor
(PerSampleDraws.share_draws), written before the epoch's iterator sends them any index.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset, Sampler

from medvlm3d.config import RunConfig
from medvlm3d.data.dataset import PerSampleDraws
from medvlm3d.data.errors import DataError
from medvlm3d.data.prompts import IGNORE_INDEX, encode_example, format_record, shuffle_choices

log = logging.getLogger(__name__)

def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 63-bit seed for (seed, epoch)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint64)[0] >> 1)


def draw_datasets(loader: Any) -> list[PerSampleDraws]:
    """The PerSampleDraws datasets behind `loader` (or a dataset), through wrappers such as Subset."""
    out, ds = [], getattr(loader, "dataset", loader)
    while ds is not None:
        if isinstance(ds, PerSampleDraws):
            out.append(ds)
        ds = getattr(ds, "dataset", None)
    return out


def set_sample_draws(loader: Any, seed: int, epoch: int) -> None:
    """Seed the per-sample draws (data/dataset.py: PerSampleDraws) of the dataset behind `loader`
    (through wrappers such as Subset) for `epoch`; before iterating the loader for that epoch
    (its persistent workers read the shared value: make_loader)."""
    for ds in draw_datasets(loader):
        ds.set_draws(seed, epoch)


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a permutation seeded by (seed, epoch), or range(n) when not shuffling.

    Length grouping (`lengths` given, `group` = the global batch, per-process batch x processes):
    the permutation is cut into windows of `window` global batches; each window is sorted by
    length (longest first, stable) and cut into global batches, whose order within the window is
    then shuffled. Each step's batch then holds samples of about one length, so little of it is
    padding, while the samples still come from a random window of the epoch (the megabatch
    scheme of Hugging Face's LengthGroupedSampler, with the batches of a window shuffled too).
    """

    def __init__(self, n: int, seed: int, shuffle: bool = True, lengths: Sequence[int] | None = None,
                 group: int = 1, window: int = 50) -> None:
        if n < 1:
            raise ValueError(f"EpochSampler needs at least one sample, got n={n}")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"EpochSampler: {len(lengths)} lengths for {n} samples")
        if group < 1 or window < 1:
            raise ValueError(f"EpochSampler: group and window must be >= 1, got {group} and {window}")
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0
        self.lengths = None if lengths is None else [int(x) for x in lengths]
        self.group, self.window = int(group), int(window)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        if self.lengths is None:
            return iter(order)
        size = self.group * self.window
        grouped: list[int] = []
        for start in range(0, self.n, size):
            window = sorted(order[start:start + size], key=lambda i: -self.lengths[i])
            batches = [window[b:b + self.group] for b in range(0, len(window), self.group)]
            for b in torch.randperm(len(batches), generator=g).tolist():
                grouped.extend(batches[b])
        return iter(grouped)

    def __len__(self) -> int:
        return self.n


def read_train_records(cfg: RunConfig) -> list[dict[str, Any]]:
    """The training records of `cfg.data.train` (honours kind, data_root, vqa_mode,
    ct_rate_target and skip_bad_records; a multi-split source gives `data.train_split`, else its
    format's train split)."""
    from medvlm3d.data.readers import read_records_report, resolve_source

    d = cfg.data
    if not d.train:
        raise ValueError("data.train is empty: give a manifest (.jsonl), M3D-Cap json, M3D-VQA csv or CT-RATE root")
    kind, split = resolve_source(d.train, d.kind, d.train_split or None, train=True)
    report = read_records_report(
        d.train,
        kind,
        data_root=d.data_root or None,
        split=split,
        vqa_mode=d.vqa_mode,
        ct_rate_target=d.ct_rate_target,
        skip_bad_records=d.skip_bad_records, allow_outside_root=d.allow_outside_root,
    )
    if report.skipped:
        log.warning("data.train: skipped %d unreadable record(s) of %s", report.skipped, d.train)
    log.info("data.train: %d records (%s) from %s", len(report.records), kind, d.train)
    return report.records


def record_task(rec: dict[str, Any], task: str, vqa_mode: str) -> str:
    """The prompt task for `rec`: data.task, with open VQA when data.vqa_mode says so
    (the same rule as StudyDataset)."""
    if task in ("", "vqa") and vqa_mode == "open" and rec.get("task") == "vqa":
        return "vqa_open"
    return task


class TextDataset(PerSampleDraws, Dataset):
    """Records as plain causal-LM text: chat-rendered question + target, no image, all tokens
    supervised (truncated to `max_len`). `context="report"`: a VQA record's question is preceded
    by the answer of the report record of the same image ("<report>\n<question>")."""

    def __init__(self, records: Sequence[dict[str, Any]], tokenizer: Any, max_len: int,
                 task: str = "", vqa_mode: str = "closed", shuffle: bool = False, context: str = "none") -> None:
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {max_len}")
        if context not in ("none", "report"):
            raise ValueError(f"context must be 'none' or 'report', got {context!r}")
        self.records, self.tokenizer, self.max_len = list(records), tokenizer, int(max_len)
        self.task, self.vqa_mode, self.shuffle = task, vqa_mode, bool(shuffle)
        self.reports: dict[str, str] = {}
        if context == "report":
            self.reports = {str(r["image"]): str(r["answer"]) for r in self.records if r.get("task") == "report"}
            orphans = [r.get("id", i) for i, r in enumerate(self.records)
                       if r.get("task") == "vqa" and str(r["image"]) not in self.reports]
            if orphans:
                raise DataError(f"data.text_context=report: {len(orphans)} VQA record(s) have no report record "
                                f"for the same image, e.g. {orphans[:3]}")

    def __len__(self) -> int:
        return len(self.records)

    def text_lengths(self) -> list[int]:
        """Tokens per sample, with the choices in their stored order (for length grouping)."""
        shuffle, self.shuffle = self.shuffle, False
        try:
            return [len(self[i]["input_ids"]) for i in range(len(self))]
        finally:
            self.shuffle = shuffle

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = shuffle_choices(self.records[i], self._generator(i)) if self.shuffle else self.records[i]
        question, target = format_record(rec, record_task(rec, self.task, self.vqa_mode))
        if self.reports and rec.get("task") == "vqa":
            question = f"{self.reports[str(rec['image'])]}\n{question}"
        # Tokenized exactly as stages 1-2 and generation do (prompt, then target + eos), only with
        # no image: a jointly tokenized "assistant: B. no" would merge the space into "ĠB" and teach
        # a token sequence that generation, whose prompt ends in "assistant: ", never produces.
        ids = encode_example(self.tokenizer, question, target, num_image_tokens=1, n_images=0,
                             max_len=self.max_len, record_id=str(rec.get("id", i)))["input_ids"]
        t = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()}


class TextCollator:
    """Right-pads text samples: pad id in input_ids, 0 in attention_mask, -100 in labels.

    `pack=True` first packs the samples into as few rows as it can (first fit, longest first),
    each row no longer than the longest sample, and returns {input_ids, labels, position_ids}
    [R, L] with no attention_mask: positions restart at 0 for each sample, which is how the
    Hugging Face causal LMs (transformers >= 4.53, `masking_utils.find_packed_sequence_indices`)
    tell packed samples apart and keep each one from attending to its neighbours. The first label
    of each sample is -100, so no token is trained to predict the next sample's first: the loss
    and its token count are those of the padded batch (tests/train/test_recipe.py checks the
    logits too). On the demo, padding is 28% of a batch's tokens and 20% once packed (tokens per step
    2944 -> 2702: most samples are longer than half the longest, so few pairs fit in a row).
    """

    def __init__(self, pad_token_id: int, pack: bool = False) -> None:
        if pad_token_id is None or int(pad_token_id) < 0:
            raise ValueError(f"pad_token_id must be a non-negative token id, got {pad_token_id!r}")
        self.pad_token_id = int(pad_token_id)
        self.pack = bool(pack)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not samples:
            raise ValueError("TextCollator got an empty list of samples")
        if self.pack:
            return self._packed(samples)

        def pad(key: str, value: int) -> torch.Tensor:
            return pad_sequence([s[key] for s in samples], batch_first=True, padding_value=value)

        return {"input_ids": pad("input_ids", self.pad_token_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", IGNORE_INDEX)}

    def _packed(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(s["input_ids"]) for s in samples]
        capacity = max(lengths)
        rows: list[list[int]] = []  # sample indices per row
        room: list[int] = []
        for i in sorted(range(len(samples)), key=lambda i: (-lengths[i], i)):  # first fit decreasing
            r = next((r for r, free in enumerate(room) if free >= lengths[i]), len(rows))
            if r == len(rows):
                rows.append([])
                room.append(capacity)
            rows[r].append(i)
            room[r] -= lengths[i]
        width = max(capacity - free for free in room)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        for r, members in enumerate(rows):
            at = 0
            for i in members:
                n = lengths[i]
                ids[r, at:at + n] = samples[i]["input_ids"]
                labels[r, at + 1:at + n] = samples[i]["labels"][1:]
                pos[r, at:at + n] = torch.arange(n)
                at += n
            pos[r, at:] = torch.arange(width - at)  # the padding tail: a sequence of its own
        return {"input_ids": ids, "labels": labels, "position_ids": pos}


def build_train_data(cfg: RunConfig, tokenizer: Any, num_visual_tokens: int) -> tuple[Dataset, Callable]:
    """The dataset and collate function of the stage `train.stage` (train/stages/)."""
    from medvlm3d.train.stages import get_stage

    return get_stage(cfg.train.stage).dataset(cfg, tokenizer, num_visual_tokens)


def study_data(cfg: RunConfig, records: list[dict], tokenizer: Any, num_visual_tokens: int,
               teacher: bool = False) -> tuple[Dataset, Callable]:
    """`StudyDataset` samples of `records` and the image-batch `Collator` (the image stages'
    data); `teacher`: the selector's teacher distribution goes into each sample (only when a loss
    reads it). With data.skip_bad_records, records that fail to load are dropped first."""
    from medvlm3d.data.collate import Collator
    from medvlm3d.data.dataset import StudyDataset

    from medvlm3d.data.select.step import SelectionPlan

    plan = SelectionPlan.from_config(cfg.model, teacher=teacher)  # 2d_only picks and pre-selection always
    ds = StudyDataset(records, cfg.data, tokenizer, num_visual_tokens, train=True, selection=plan)
    if cfg.data.skip_bad_records:
        dropped = ds.drop_bad_records()
        log.info("data.skip_bad_records: dropped %d of %d records after loading each once", dropped, len(records))
        if len(ds) == 0:
            raise DataError(f"data.train {cfg.data.train!r}: every record failed to load")
    return ds, Collator(tokenizer.pad_token_id)


def make_loader(dataset: Dataset, collate_fn: Callable, cfg: RunConfig,
                processes: int = 1) -> tuple[DataLoader, EpochSampler]:
    """A DataLoader of per-process batches of `train.batch_size`, ordered by an EpochSampler
    (grouped by text length when train.group_by_length; `processes` sets the global batch)."""
    if len(dataset) < cfg.train.batch_size:
        raise ValueError(
            f"data.train has {len(dataset)} samples, fewer than train.batch_size={cfg.train.batch_size}"
        )
    lengths = None
    if cfg.train.group_by_length:
        if not hasattr(dataset, "text_lengths"):
            raise ValueError(f"train.group_by_length: {type(dataset).__name__} has no text_lengths()")
        lengths = dataset.text_lengths()
    sampler = EpochSampler(len(dataset), cfg.train.seed, lengths=lengths,
                           group=cfg.train.batch_size * cfg.train.grad_accum * processes)
    workers = int(cfg.data.num_workers)
    if workers > 0:  # the workers persist across epochs: each epoch's set_sample_draws must reach them
        for ds in draw_datasets(dataset):
            ds.share_draws()
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=True,
        num_workers=workers,
        pin_memory=bool(cfg.data.pin_memory) and torch.cuda.is_available(),
        # started once, not every epoch (a fork and a cold page cache per epoch); the per-sample
        # draws reach them through shared memory (set_sample_draws), so resume stays exact
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(epoch_seed(cfg.train.seed, 0)),
    )
    return loader, sampler
