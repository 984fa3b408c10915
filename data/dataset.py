"""StudyDataset: manifest records -> samples (volume, slices, prompt ids, labels, slice targets).

    StudyDataset(records, data_cfg, tokenizer, num_image_tokens, train=False)[i] -> dict:
      id: str
      volume [n_img, 1, D, H, W] float; slices [n_img, S, 1, h, w] float
      slice_plane [n_img, S] long; slice_index [n_img, S] long; slice_pos [n_img, S] float
      input_ids, labels, attention_mask [L] long     (data/prompts.py: encode_example)
      question_ids [Lq] long                          the question text alone, no special tokens
      question, target: str                           (data/prompts.py: format_record)
      slice_target [n_img, S] float; has_slice_target [n_img] bool
      teacher [n_img, S] float; slice_keep [n_img, P] long   (only with a `selection` plan asking)
      record: the manifest dict

The image tensors come from `data/select/step.py: study_tensors` (pre-selection, teacher and
picks on the data side); with pre-selection S is `model.preselect_k`.

With `data.preprocessed`, studies come from that `medvlm3d preprocess` folder instead
(data/shards.py), with the selection stored there. Otherwise volumes come from
`medvlm3d.data.volume.load_study` with the record's CT rescale slope and
intercept when its `meta` carries them. The sequence limit is `data_cfg.max_text_len` text
tokens plus `n_img * num_image_tokens` image tokens.

`slice_labels` (axial indices at the image's native depth; a list for all images of the record,
or one list per image) become `slice_target`: axial slice j of image i is 1.0 when
floor(slice_pos[i, j] * native_depth[i]) is a label; other planes are 0. `has_slice_target[i]`
is True when the record has labels for image i and the image has axial slices.

Per-sample randomness (training): after `set_draws(seed, epoch)` (the training loop calls it
each epoch), the choice shuffle and the augmentation of sample i draw from
`sample_generator(seed, epoch, i)` alone, never from the global RNG, so a sample is the same
whichever worker loads it, in whatever order, and however far the loader read ahead before a
checkpoint: a resumed run sees exactly the samples of an uninterrupted one. Before set_draws
(evaluation, direct use) they draw from torch's global RNG as before.

Every error while reading a record is a `DataError` naming the record id. With
`data_cfg.skip_bad_records`, call `drop_bad_records()` once before training: it loads every
record (`validate()`), logs and drops the bad ones, and returns how many it dropped.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from medvlm3d.config_fields import MAX_SIDE, PLANES, check_choice, check_positive
from .errors import ConfigError, DataError
from .prompts import encode_example, format_record, image_token_id, shuffle_choices
from .select.step import SelectionPlan, cache_name, study_tensors


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator seeded by (seed, epoch, sample index), well mixed (numpy SeedSequence)."""
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> 1))


class PerSampleDraws:
    """`set_draws(seed, epoch)`; then `_generator(i)` is sample i's own generator (None before).
    (Not named set_epoch: Accelerate calls a dataset's set_epoch(epoch) itself.)

    `share_draws()` (train/data.py: make_loader, before any worker starts) moves the (seed, epoch)
    into a shared-memory tensor, so that a later `set_draws` in the main process reaches the
    persistent DataLoader workers too, which forked a copy of the dataset once."""

    _draws: torch.Tensor | None = None  # [3] long: (set?, seed, epoch); shared once share_draws ran

    def share_draws(self) -> None:
        if self._draws is None:
            self._draws = torch.zeros(3, dtype=torch.long)
        if not self._draws.is_shared():
            self._draws = self._draws.share_memory_()

    def set_draws(self, seed: int, epoch: int) -> None:
        value = torch.tensor([1, int(seed), int(epoch)], dtype=torch.long)
        if self._draws is None:
            self._draws = value
        else:
            self._draws.copy_(value)  # in place: seen by the workers when shared

    def _generator(self, index: int) -> torch.Generator | None:
        d = self._draws
        if d is None or not int(d[0]):
            return None
        return sample_generator(int(d[1]), int(d[2]), index)


@dataclass
class DataConfig:
    """How volumes and records become batches.

    `size` is the (D, H, W) the volume is resized to for the 3D encoder; `slice_size` is the
    (h, w) of each 2D slice for the slice encoder. `num_slices`: 0 means one axial slice per
    depth row of the resized volume (S = D); N > 0 resamples each plane to N slices; -1 keeps
    the native axial count of the oriented volume (capped at `max_slices`), so S varies.
    """

    train: str = ""
    val: str = ""
    test: str = ""
    kind: str = "auto"  # auto | a format registered in data/formats/ (checked when read: plugins may add one)
    train_split: str = ""  # split inside a multi-split source: M3D-Cap train|validation|test, CT-RATE train|valid
    eval_split: str = ""  # the same for `val` / `test` sources
    data_root: str = ""
    task: str = ""  # "" keeps the records' own task; report | vqa | vqa_closed | vqa_open
    vqa_mode: str = "closed"  # closed | open, for M3D-VQA
    ct_rate_target: str = "findings"  # findings | findings_impressions
    size: tuple[int, int, int] = (32, 64, 64)
    slice_size: tuple[int, int] = (64, 64)
    num_slices: int = 0
    max_slices: int = 256
    planes: tuple[str, ...] = ("axial",)
    modality: str = "auto"  # auto | ct | mri
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    mri_percentiles: tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = False
    augment: bool = False
    shuffle_choices: bool = False  # training: re-permute closed choices per draw (data/prompts.py)
    # stage0_text: "report" puts each VQA question after its study's report, where the image goes
    # in later stages, so the text-only LLM learns to answer from evidence, not from priors
    text_context: str = "none"
    text_packing: bool = True  # stage0_text: pack samples into rows instead of padding (train/data.py)
    cache_dir: str = ""
    # a `medvlm3d preprocess` folder: studies are read from its shards (memory-mapped; no decode,
    # no resample; the stored Vote-MI selection reused), refused if made with other settings
    preprocessed: str = ""
    # a `medvlm3d encode` folder: the frozen encoders' outputs, looked up by the model (model/features.py)
    features: str = ""
    max_voxels: int = 1024 * 1024 * 1024
    oversize: str = "downsample"  # downsample | refuse
    max_load_bytes: int = 2 * 1024**3  # peak memory of one volume load, from its header (data/guard.py); <= 0: off
    allow_outside_root: bool = False  # records may name images outside their data root (../, absolute paths)
    skip_bad_records: bool = False
    max_text_len: int = 256
    num_workers: int = 0
    pin_memory: bool = True  # page-locked batches for a faster host -> GPU copy (only when a CUDA device is present)

    def __post_init__(self) -> None:
        check_choice("data.task", self.task, ("", "report", "vqa", "vqa_closed", "vqa_open"))
        check_choice("data.vqa_mode", self.vqa_mode, ("closed", "open"))
        check_choice("data.ct_rate_target", self.ct_rate_target, ("findings", "findings_impressions"))
        check_choice("data.modality", self.modality, ("auto", "ct", "mri"))
        check_choice("data.text_context", self.text_context, ("none", "report"))
        check_choice("data.oversize", self.oversize, ("downsample", "refuse"))
        check_positive("data.size", self.size, 3, upper=MAX_SIDE)
        check_positive("data.slice_size", self.slice_size, 2, upper=MAX_SIDE)
        for plane in self.planes:
            check_choice("data.planes", plane, PLANES)
        if self.num_slices < -1:
            raise ConfigError(f"data.num_slices must be -1, 0 or positive, got {self.num_slices}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"data.hu_window must be (low, high) with low < high, got {self.hu_window}")


logger = logging.getLogger(__name__)

_SLOPE_KEYS = ("rescale_slope", "RescaleSlope", "slope")
_INTERCEPT_KEYS = ("rescale_intercept", "RescaleIntercept", "intercept")


def _rescale(rec: dict[str, Any], rid: str) -> tuple[float, float] | None:
    """(slope, intercept) from the record's meta (CT-RATE), or None."""
    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise DataError(f"record {rid!r}: 'meta' must be a mapping, got {type(meta).__name__}")
    slope = next((meta[k] for k in _SLOPE_KEYS if meta.get(k) not in (None, "")), None)
    inter = next((meta[k] for k in _INTERCEPT_KEYS if meta.get(k) not in (None, "")), None)
    if slope is None and inter is None:
        return None
    try:
        out = (float(1.0 if slope is None else slope), float(0.0 if inter is None else inter))
    except (TypeError, ValueError) as e:
        raise DataError(f"record {rid!r}: rescale slope/intercept must be numbers, got {slope!r}, {inter!r}") from e
    if not all(math.isfinite(v) for v in out):
        raise DataError(f"record {rid!r}: rescale slope/intercept must be finite, got {out}")
    return out


def slice_targets(
    slice_labels: Any, slice_plane: torch.Tensor, slice_pos: torch.Tensor, native_depth: Sequence[int], rid: str = ""
) -> tuple[torch.Tensor, torch.Tensor]:
    """(slice_target [n_img, S] float, has_slice_target [n_img] bool); see the module docstring."""
    n_img, n_sl = slice_pos.shape
    target = torch.zeros(n_img, n_sl, dtype=torch.float32)
    has = torch.zeros(n_img, dtype=torch.bool)
    if slice_labels is None:
        return target, has
    if not isinstance(slice_labels, (list, tuple)):
        raise DataError(f"record {rid!r}: 'slice_labels' must be a list of axial indices, got {slice_labels!r}")
    nested = len(slice_labels) > 0 and all(isinstance(x, (list, tuple)) for x in slice_labels)
    per_image = list(slice_labels) if nested else [slice_labels] * n_img
    if len(per_image) != n_img:
        raise DataError(f"record {rid!r}: 'slice_labels' holds {len(per_image)} lists for {n_img} images")
    for i, labels in enumerate(per_image):
        depth = int(native_depth[i])
        try:
            lab = torch.tensor(sorted({int(x) for x in labels}), dtype=torch.long)
        except (TypeError, ValueError) as e:
            raise DataError(f"record {rid!r}: 'slice_labels' must be integers, got {labels!r}") from e
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= depth):
            raise DataError(
                f"record {rid!r}: slice_labels must lie in [0, {depth - 1}] (native axial depth of image {i}), "
                f"got {lab.tolist()}"
            )
        axial = slice_plane[i] == 0
        if not bool(axial.any()):
            continue
        native = torch.floor(slice_pos[i].double() * depth).long().clamp_(0, depth - 1)
        target[i] = (torch.isin(native, lab) & axial).float()
        has[i] = True
    return target, has


class StudyDataset(PerSampleDraws, Dataset):
    """Map-style dataset over manifest records (see data/readers.py for the record keys)."""

    def __init__(
        self,
        records: Sequence[dict[str, Any]],
        data_cfg: DataConfig,
        tokenizer: Any,
        num_image_tokens: int,
        train: bool = False,
        selection: SelectionPlan | None = None,
    ) -> None:
        if not isinstance(data_cfg, DataConfig):
            raise ValueError(f"data_cfg must be a DataConfig, got {type(data_cfg).__name__}")
        if int(num_image_tokens) < 1:
            raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
        image_token_id(tokenizer)  # fail early on a tokenizer without <image>
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (tokenizer.pad_token)")
        self.records = list(records)
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.num_image_tokens = int(num_image_tokens)
        self.train = bool(train)
        self.selection = selection
        self.bad: list[tuple[str, str]] | None = None  # set by validate()
        self._bad_index: list[int] = []
        self.shards = None
        if data_cfg.preprocessed:  # opened (and its settings checked) now: a mismatch fails early
            from .shards import ShardCache, settings

            self.shards = ShardCache(data_cfg.preprocessed,
                                     settings(data_cfg, selection.settings if selection is not None else None))

    def __len__(self) -> int:
        return len(self.records)

    def text_lengths(self) -> list[int]:
        """Text tokens of each record's prompt and target (choices in their stored order; image
        tokens not counted), read without loading a volume: what length grouping sorts by. A
        malformed record counts 0 here and raises its DataError when it is loaded."""
        out = []
        for rec in self.records:
            try:
                question, target = format_record(rec, self._task(rec))
            except (DataError, AttributeError, TypeError):
                out.append(0)
                continue
            out.append(len(self.tokenizer(f"{question}\n{target}", add_special_tokens=False)["input_ids"]))
        return out

    def _id(self, i: int) -> str:
        rec = self.records[i]
        return str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"

    def _task(self, rec: dict[str, Any]) -> str:
        task = self.cfg.task
        if task in ("", "vqa") and self.cfg.vqa_mode == "open" and rec.get("task") == "vqa":
            return "vqa_open"
        return task

    def _load(self, rec: dict[str, Any], rid: str, aug_seed: int | None = None) -> Any:
        from .volume import load_study  # imported late: volume.py pulls in MONAI

        if not rec.get("image"):
            raise DataError(f"record {rid!r}: 'image' is missing or empty")
        kwargs: dict[str, Any] = {}
        rescale = _rescale(rec, rid)
        if rescale is not None:
            kwargs["rescale"] = rescale
        if aug_seed is not None and self.cfg.augment:
            kwargs["aug_seed"] = aug_seed
        try:
            return load_study(rec["image"], self.cfg, train=self.train, **kwargs)
        except Exception as e:  # wrap any loader error so that it names the record
            raise DataError(f"record {rid!r}: cannot load {rec['image']!r}: {e}") from e

    def _from_shards(self, rec: dict[str, Any], rid: str,
                     aug_seed: int | None = None) -> tuple[Any, dict[str, torch.Tensor] | None]:
        """(Study, stored selection or None) of the record's study from `data.preprocessed`;
        augmentation (training) runs here, on the stored study, and then the selection is redone."""
        from .shards import study_key
        from .volume import Study, augment_study

        if not rec.get("image"):
            raise DataError(f"record {rid!r}: 'image' is missing or empty")
        t, chosen = self.shards.get(study_key(rec["image"], _rescale(rec, rid)), f"record {rid!r}")
        study = Study(t["volume"], t["slices"], t["slice_plane"], t["slice_index"], t["slice_pos"],
                      [int(x) for x in t["native_depth"].tolist()])
        if self.train and self.cfg.augment:
            return augment_study(study, self.cfg, aug_seed), None
        return study, (chosen if self.selection is not None and self.shards.has_selection else None)

    def _selection_cache(self, rec: dict[str, Any], i: int, slice_target: torch.Tensor) -> Path | None:
        """Where the study's slice selection is cached: beside its preprocessed volume (only with
        data.cache_dir, and never for augmented training items, whose slices change each draw)."""
        if self.selection is None or not self.cfg.cache_dir or (self.train and self.cfg.augment):
            return None
        from .volume import cache_key

        image = rec["image"]
        paths = [Path(image)] if isinstance(image, (str, os.PathLike)) else [Path(p) for p in image]
        name = cache_name(cache_key(paths, self.cfg, _rescale(rec, self._id(i))), self.selection, i, slice_target)
        return None if name is None else Path(self.cfg.cache_dir) / name

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        rid = self._id(i)
        if not isinstance(rec, dict):
            raise DataError(f"record {rid!r}: must be a dict, got {type(rec).__name__}")
        gen = self._generator(i) if self.train else None
        if self.train and self.cfg.shuffle_choices:
            rec = shuffle_choices(rec, gen)
        question, target = format_record(rec, self._task(rec))
        aug_seed = None if gen is None else int(torch.randint(0, 2**31 - 1, (), generator=gen))
        study, chosen = (self._from_shards(rec, rid, aug_seed) if self.shards is not None
                         else (self._load(rec, rid, aug_seed), None))
        n_img = int(study.volume.shape[0])
        enc = encode_example(
            self.tokenizer,
            question,
            target,
            self.num_image_tokens,
            n_images=n_img,
            max_len=self.cfg.max_text_len + n_img * self.num_image_tokens,
            record_id=rid,
        )
        q_ids = self.tokenizer(question, add_special_tokens=False)["input_ids"] or [self.tokenizer.pad_token_id]
        slice_target, has_target = slice_targets(
            rec.get("slice_labels"), study.slice_plane, study.slice_pos, study.native_depth, rid
        )
        images = study_tensors(study, self.selection, index=i, slice_target=slice_target, chosen=chosen,
                               cache=None if chosen is not None else self._selection_cache(rec, i, slice_target))
        return {
            "id": rid,
            **images,
            "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
            "labels": torch.tensor(enc["labels"], dtype=torch.long),
            "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
            "question_ids": torch.tensor(q_ids, dtype=torch.long),
            "question": question,
            "target": target,
            "has_slice_target": has_target,
            "record": rec,
        }

    def validate(self) -> list[tuple[str, str]]:
        """Read every record once; returns (id, message) for each bad one (also kept in `.bad`)."""
        bad: list[tuple[str, str]] = []
        self._bad_index = []
        for i in range(len(self.records)):
            try:
                self[i]
            except DataError as e:
                bad.append((self._id(i), str(e)))
                self._bad_index.append(i)
        self.bad = bad
        return bad

    def drop_bad_records(self) -> int:
        """Validate (if not done yet), log and drop the bad records; returns how many were dropped."""
        bad = self.validate() if self.bad is None else self.bad
        for rid, msg in bad:
            logger.warning("skipping bad record %s: %s", rid, msg)
        drop = set(self._bad_index)
        before = len(self.records)
        self.records = [r for i, r in enumerate(self.records) if i not in drop]
        dropped = before - len(self.records)
        if dropped:
            logger.warning("dropped %d of %d records (data.skip_bad_records)", dropped, before)
        self.bad, self._bad_index = [], []
        return dropped
