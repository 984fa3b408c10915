"""Typed run configuration: one dataclass per component, nested in `RunConfig`.

A config is read from YAML (always `yaml.safe_load`), optionally inheriting from another YAML
through a top-level `base:` key, then patched by `key=value` overrides such as
`model.tgis.tau=3` or `train.max_steps=50`. Every key is checked against the dataclass fields:
an unknown key raises `ConfigError` naming it and listing the valid keys.

This module imports no torch, so reading a config is cheap. The component modules under
`medvlm3d.model` take their section of this config (e.g. `TGISConfig`) in their constructors.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import yaml

from .errors import ConfigError

# --------------------------------------------------------------------------------------------
# data


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
    kind: str = "auto"  # auto | manifest | m3d_cap | m3d_vqa | ct_rate
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
    max_voxels: int = 1024 * 1024 * 1024
    oversize: str = "downsample"  # downsample | refuse
    skip_bad_records: bool = False
    max_text_len: int = 256
    num_workers: int = 0

    def __post_init__(self) -> None:
        _check_choice("data.kind", self.kind, ("auto", "manifest", "m3d_cap", "m3d_vqa", "ct_rate"))
        _check_choice("data.task", self.task, ("", "report", "vqa", "vqa_closed", "vqa_open"))
        _check_choice("data.vqa_mode", self.vqa_mode, ("closed", "open"))
        _check_choice("data.ct_rate_target", self.ct_rate_target, ("findings", "findings_impressions"))
        _check_choice("data.modality", self.modality, ("auto", "ct", "mri"))
        _check_choice("data.text_context", self.text_context, ("none", "report"))
        _check_choice("data.oversize", self.oversize, ("downsample", "refuse"))
        _check_positive("data.size", self.size, 3)
        _check_positive("data.slice_size", self.slice_size, 2)
        for plane in self.planes:
            _check_choice("data.planes", plane, PLANES)
        if self.num_slices < -1:
            raise ConfigError(f"data.num_slices must be -1, 0 or positive, got {self.num_slices}")
        if self.hu_window[0] >= self.hu_window[1]:
            raise ConfigError(f"data.hu_window must be (low, high) with low < high, got {self.hu_window}")


PLANES = ("axial", "coronal", "sagittal")

# --------------------------------------------------------------------------------------------
# model components


@dataclass
class Encoder3DConfig:
    """3D encoder over [B, 1, D, H, W] -> tokens [B, N3, hidden_size] on a known grid."""

    arch: str = "vit"  # registry name: vit | resnet
    img_size: tuple[int, int, int] = (32, 64, 64)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 128
    dropout: float = 0.0
    resnet_layers: tuple[int, ...] = (1, 1, 1, 1)
    resnet_widths: tuple[int, ...] = (16, 32, 64, 128)
    resnet_conv1_stride: int = 1  # 1 (MONAI's default) or 2: with resnet_max_pool false, the same grid, 4x cheaper
    resnet_max_pool: bool = True
    weights: str = ""
    weights_key_map: str = ""  # "" | m3d_clip
    gradient_checkpointing: bool = False  # recompute ViT blocks / ResNet stages in backward (saves memory)

    def __post_init__(self) -> None:
        _check_positive("encoder3d.img_size", self.img_size, 3)
        _check_positive("encoder3d.patch_size", self.patch_size, 3)
        _check_choice("encoder3d.weights_key_map", self.weights_key_map, ("", "m3d_clip"))
        _check_choice("encoder3d.resnet_conv1_stride", self.resnet_conv1_stride, (1, 2))


@dataclass
class SliceEncoderConfig:
    """timm 2D backbone over each slice: [B, S, 1, h, w] -> [B, S, T, D2]."""

    model_name: str = "resnet18"
    in_chans: int = 1  # 1, or 3 by repeating the grey channel
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    num_tokens: int = 4  # T: tokens per slice after pooling
    chunk_size: int = 64  # slices per backbone call
    gradient_checkpointing: bool = False  # timm set_grad_checkpointing on the backbone (saves memory)

    def __post_init__(self) -> None:
        _check_choice("slice_encoder.in_chans", self.in_chans, (1, 3))
        if self.num_tokens < 1 or self.chunk_size < 1:
            raise ConfigError("slice_encoder.num_tokens and slice_encoder.chunk_size must be >= 1")


@dataclass
class InterSliceConfig:
    """MS-VLM style transformer along the slice axis: [B, S, T, D2] -> [B, S, T, D2]."""

    num_layers: int = 1
    num_heads: int = 4
    max_slices: int = 512
    num_planes: int = 3
    num_series: int = 4
    dropout: float = 0.0


@dataclass
class TGISConfig:
    """Text-guided inter-slice scoring (Med-2E3): scores [B, S] and fused z2d [B, T, Dl]."""

    tau: float = 5.0
    top_k: int = 0  # 0 = soft weighting over all slices
    text_source: str = "llm"  # llm | hf
    text_encoder: str = ""  # local HF folder when text_source == "hf"
    pos_embed: bool = False  # add a learned slice-position (and plane) embedding to each slice's tokens

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ConfigError(f"tgis.tau must be > 0, got {self.tau}")
        if self.top_k < 0:
            raise ConfigError(f"tgis.top_k must be >= 0, got {self.top_k}")
        _check_choice("tgis.text_source", self.text_source, ("llm", "hf"))


@dataclass
class VoteMIConfig:
    """Vote-MI slice selection and teacher distribution."""

    k: int = 5  # each slice votes for its k nearest neighbours
    num_picks: int = 4
    teacher: str = "picks"  # off | votes | picks
    features: str = "intensity"  # intensity | encoder
    feature_size: int = 16  # side of the downsampled slice used by intensity features

    def __post_init__(self) -> None:
        _check_choice("vote_mi.teacher", self.teacher, ("off", "votes", "picks"))
        _check_choice("vote_mi.features", self.features, ("intensity", "encoder"))
        if self.k < 1 or self.num_picks < 1:
            raise ConfigError("vote_mi.k and vote_mi.num_picks must be >= 1")


@dataclass
class ProjectorConfig:
    """3D pooling + MLP and 2D MLP into the LLM width."""

    pool3d: tuple[int, int, int] = (1, 2, 2)  # kernel on the 3D token grid
    depth: int = 2  # MLP layers
    hidden_size: int = 0  # 0 = the LLM width
    # LayerNorm on the projected tokens, its gain started at the RMS of the LLM's input embeddings,
    # so visual tokens enter the LLM at the scale of its text tokens
    out_norm: bool = False


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LLMConfig:
    """HF causal LM: a local folder (`path`) or a tiny model built from these fields."""

    path: str = ""
    arch: str = "llama"  # llama | qwen2, when built from config
    tokenizer: str = ""  # local tokenizer folder ("" = `path`)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        _check_choice("llm.arch", self.arch, ("llama", "qwen2"))
        _check_choice("llm.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclass
class TrainablePolicy:
    """Per component: frozen | full (| lora for the LLM)."""

    encoder3d: str = "full"
    slice_encoder: str = "full"
    inter_slice: str = "full"
    tgis: str = "full"
    projector: str = "full"
    llm: str = "lora"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            allowed = ("frozen", "lora", "full") if f.name == "llm" else ("frozen", "full")
            _check_choice(f"trainable.{f.name}", getattr(self, f.name), allowed)


VARIANTS = ("2e3", "2e3_interslice", "3d_only", "2d_only")


@dataclass
class ModelConfig:
    variant: str = "2e3"
    encoder3d: Encoder3DConfig = field(default_factory=Encoder3DConfig)
    slice_encoder: SliceEncoderConfig = field(default_factory=SliceEncoderConfig)
    inter_slice: InterSliceConfig = field(default_factory=InterSliceConfig)
    tgis: TGISConfig = field(default_factory=TGISConfig)
    vote_mi: VoteMIConfig = field(default_factory=VoteMIConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    trainable: TrainablePolicy = field(default_factory=TrainablePolicy)

    def __post_init__(self) -> None:
        _check_choice("model.variant", self.variant, VARIANTS)


# --------------------------------------------------------------------------------------------
# training and evaluation


@dataclass
class TrainConfig:
    stage: str = "stage2_finetune"  # stage0_text | stage0_clip | stage1_align | stage2_finetune
    init_from: str = ""  # checkpoint folder of the previous stage
    output_dir: str = "runs/demo"
    seed: int = 0
    max_steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    lr_per_component: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    warmup_steps: int = 10
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
        from medvlm3d.train.stages import STAGES  # the registered stages (train/stages/, plugins)

        _check_choice("train.stage", self.stage, tuple(STAGES.names()))
        _check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        _check_choice("train.distill_schedule", self.distill_schedule, ("constant", "linear_decay"))
        _check_choice("train.contrastive_pool", self.contrastive_pool, ("mean", "max"))
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.batch_size and train.grad_accum must be >= 1")
        if self.feature_cache_mb < 0:
            raise ConfigError(f"train.feature_cache_mb must be >= 0 (0 = off), got {self.feature_cache_mb}")


@dataclass
class EvalConfig:
    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    bertscore_model: str = ""


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# --------------------------------------------------------------------------------------------
# loading


def _check_choice(key: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _check_positive(key: str, value: Sequence[int], n: int) -> None:
    if len(value) != n or any(int(v) <= 0 for v in value):
        raise ConfigError(f"{key} must be {n} positive integers, got {value!r}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated field type, recursing into dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        args = typing.get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(v, elem, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, bool):  # YAML 1.1 reads a bare off/on (no/yes) as a bool
            return "on" if value else "off"
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value


# Named presets per section (torch-free). A YAML section may say `preset: vit3d_m3d`; the
# preset's fields come first and the section's own keys override them.
PRESETS: dict[type, dict[str, dict[str, Any]]] = {
    Encoder3DConfig: {
        # M3D-CLIP's vision tower: 32x256x256, patch 4x16x16 -> 8x16x16 = 2,048 tokens.
        "vit3d_m3d": dict(arch="vit", img_size=(32, 256, 256), patch_size=(4, 16, 16), hidden_size=768,
                          num_layers=12, num_heads=12, mlp_dim=3072),
        "vit3d_small": dict(arch="vit", img_size=(32, 256, 256), patch_size=(4, 16, 16), hidden_size=384,
                            num_layers=6, num_heads=6, mlp_dim=1536),
        "vit3d_tiny": dict(arch="vit", img_size=(32, 64, 64), patch_size=(4, 16, 16), hidden_size=64,
                           num_layers=2, num_heads=4, mlp_dim=128),
        "resnet3d_tiny": dict(arch="resnet", img_size=(32, 64, 64), resnet_layers=(1, 1, 1, 1),
                              resnet_widths=(16, 32, 64, 128)),
    },
}


def preset_names(cls: type) -> list[str]:
    return sorted(PRESETS.get(cls, {}))


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys (a `preset` key expands first)."""
    if "preset" in data:
        data = dict(data)
        name = data.pop("preset")
        table = PRESETS.get(cls, {})
        if name not in table:
            where = f"{prefix}.preset" if prefix else "preset"
            raise ConfigError(f"{where}: unknown preset {name!r}; known: {sorted(table)}")
        data = {**table[name], **data}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), ready for `yaml.safe_dump`."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_dir() -> Path:
    """The folder of YAML configs shipped with the package."""
    return Path(str(resources.files("medvlm3d.configs")))


def _resolve(path_or_name: str | Path, relative_to: Path | None = None) -> Path:
    p = Path(path_or_name)
    candidates = [p]
    if relative_to is not None:
        candidates.append(relative_to / p)
    if p.suffix not in (".yaml", ".yml"):
        candidates.append(config_dir() / f"{p}.yaml")
    else:
        candidates.append(config_dir() / p)
    for c in candidates:
        if c.is_file():
            return c
    shipped = sorted(x.stem for x in config_dir().glob("*.yaml"))
    raise ConfigError(f"config {str(path_or_name)!r} not found; give a YAML path or one of {shipped}")


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"config {path} inherits from itself through 'base'")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a mapping at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _read_yaml(_resolve(base, path.parent), seen + (path,))
    return deep_merge(merged, raw)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings; values are parsed as YAML scalars or lists."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.subkey=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not a plain YAML scalar or list ({e})") from e
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def load_config(
    path_or_name: str | Path | dict[str, Any] = "demo",
    overrides: Sequence[str] = (),
    layers: Sequence[str | Path] = (),
) -> RunConfig:
    """Read a run config from a YAML path, a shipped config name (e.g. "demo"), or a dict.

    `layers` are further YAMLs (paths or shipped names, e.g. a stage such as "stage1_align")
    deep-merged on top in order; `overrides` (`a.b=value`) are applied last.
    """
    raw = dict(path_or_name) if isinstance(path_or_name, dict) else _read_yaml(_resolve(path_or_name))
    for layer in layers:
        raw = deep_merge(raw, _read_yaml(_resolve(layer)))
    return from_dict(RunConfig, apply_overrides(raw, overrides))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
