"""The language side: tokenizer, Hugging Face causal LM, PEFT LoRA, and an optional text encoder.

- `load_tokenizer(cfg)`: a tokenizer from a local folder (`cfg.tokenizer` or `cfg.path`), with the
  `<image>` placeholder registered as a special token and a pad token set.
- `build_llm(cfg, tokenizer, device_map=None)`: a causal LM, either from a local checkpoint folder
  (`cfg.path`) or randomly initialised from the config fields (registry `LLM_ARCHS`: "llama",
  "qwen2", "phi3"). Its input embeddings are grown to `len(tokenizer)` when the tokenizer has more tokens
  than the model. `device_map` ("auto", "balanced", a dict, ...) dispatches a folder's LM over
  several devices through accelerate (big-model inference).
  forward(inputs_embeds [B, L, Dl], attention_mask [B, L]) -> logits [B, L, V].
- `apply_lora(model, lora_cfg)` -> `peft.PeftModel` (`target_modules: auto` picks the family's
  linear layers, model/llm_family.py); `merge_lora` folds the adapter back in.
- An architecture that refuses `attn_implementation` (Gemma2 with sdpa) falls back to eager, with
  a warning naming `model.llm.attn_implementation`.
- `embed_tokens(model, input_ids [B, L]) -> [B, L, Dl]`, for plain and PEFT-wrapped models alike.
- `TextEncoder(path)`: a local HF encoder (e.g. BERT); forward(list of B strings) -> [B, out_dim].

Nothing here ever reaches a model hub: every `from_pretrained` call passes `local_files_only=True`
and a missing folder raises `FileNotFoundError` before transformers is asked.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    Phi3Config,
    Qwen2Config,
)

from medvlm3d.config_fields import check_choice
from medvlm3d.data.errors import ConfigError
from medvlm3d.model.llm_family import grow_embeddings, lora_targets, with_attn_fallback
from medvlm3d.registry import Registry


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    # module-name suffixes, or "auto": every linear layer type of the LLM's family but its head
    target_modules: tuple[str, ...] | str = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):  # a YAML list: the same tuple as the default
            self.target_modules = tuple(self.target_modules)


@dataclass
class LLMConfig:
    """HF causal LM: a local folder (`path`) or a tiny model built from these fields."""

    path: str = ""
    arch: str = "llama"  # LLM_ARCHS name: llama | qwen2, when built from config
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
        check_choice("llm.arch", self.arch, LLM_ARCHS.names())
        check_choice("llm.dtype", self.dtype, ("float32", "bfloat16", "float16"))


log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TF5 = Version(transformers.__version__).major >= 5
# transformers 4.56 renamed `torch_dtype` to `dtype`; 5.x warns on the old name.
_DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"

# Registry of architectures buildable from config fields: name -> HF config object. The model
# class follows from the config type through AutoModelForCausalLM
# (LlamaConfig -> LlamaForCausalLM, Qwen2Config -> Qwen2ForCausalLM).
LLM_ARCHS = Registry("llm arch")


@LLM_ARCHS.register("llama")
def _llama_config(**fields: Any) -> PretrainedConfig:
    return LlamaConfig(**fields)


@LLM_ARCHS.register("qwen2")
def _qwen2_config(**fields: Any) -> PretrainedConfig:
    return Qwen2Config(**fields)


@LLM_ARCHS.register("phi3")
def _phi3_config(**fields: Any) -> PretrainedConfig:
    return Phi3Config(**fields)  # Phi-3-mini's shape from config (fused qkv_proj / gate_up_proj)


def _local_dir(path: str, what: str, need: tuple[str, ...] = ()) -> Path:
    """The folder `path` as a Path, or a clear error (no hub look-up is ever attempted)."""
    if not path:
        raise ConfigError(f"{what}: no local folder given (set it to a folder holding the files)")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ConfigError(f"{what}: folder {str(p)!r} does not exist (models are read from local folders only)")
    files = sorted(x.name for x in p.iterdir())
    if not files:
        raise ConfigError(f"{what}: folder {str(p)!r} is empty")
    for name in need:
        if name not in files:
            raise ConfigError(f"{what}: folder {str(p)!r} has no {name} (it holds {files[:10]})")
    return p


@contextlib.contextmanager
def _load_errors(what: str, folder: Path, kind: str) -> Iterator[None]:
    """Re-raise transformers' loading errors with the config key and folder named."""
    try:
        yield
    except OSError as e:
        raise FileNotFoundError(f"{what}: could not load a {kind} from {str(folder)!r}: {e}") from e
    except ValueError as e:
        raise ValueError(f"{what}: could not load a {kind} from {str(folder)!r}: {e}") from e


# ------------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer(cfg: LLMConfig) -> Any:
    """Tokenizer from the local folder `cfg.tokenizer` (or `cfg.path` when that is empty).

    Registers `<image>` as an extra special token (never split) when it is missing, and sets a pad
    token (the eos token, or a new `<pad>`) when there is none. Adding tokens here means the LM's
    embeddings must grow, which `build_llm` does.
    """
    folder = _local_dir(cfg.tokenizer or cfg.path, "llm.tokenizer (or llm.path)")
    with _load_errors("llm.tokenizer (or llm.path)", folder, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code, local_files_only=True)
    ensure_special_tokens(tok)
    return tok


def ensure_special_tokens(tok: Any) -> int:
    """Add `<image>` (extra special token) and a pad token when missing; returns how many tokens
    were added to the vocabulary."""
    before = len(tok)
    if IMAGE_TOKEN not in tok.all_special_tokens:
        key = "extra_special_tokens" if _TF5 else "additional_special_tokens"
        # Second positional argument: keep the existing extra special tokens (its keyword name
        # differs between transformers 4 and 5).
        tok.add_special_tokens({key: [IMAGE_TOKEN]}, False)
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": PAD_TOKEN})
    added = len(tok) - before
    if added:
        log.info("tokenizer: added %d special token(s); vocabulary now %d", added, len(tok))
    return added


# ------------------------------------------------------------------------------------------------
# causal LM


def build_llm(cfg: LLMConfig, tokenizer: Any, device_map: Any = None) -> PreTrainedModel:
    """A causal LM from the local folder `cfg.path`, or randomly initialised from `cfg`'s fields.

    The input (and output) embeddings are resized to `len(tokenizer)` when the tokenizer holds
    tokens the model cannot embed (e.g. the `<image>` token `load_tokenizer` added); a larger
    embedding table (padded vocabularies, as in Qwen) is kept as is.

    device_map: passed to `from_pretrained` (accelerate's big-model dispatch: "auto", "balanced",
        "balanced_low_0", "sequential", a device, or a dict {module name: device}); the layers
        may then sit on several devices. Needs `cfg.path` (weights to load).
    """
    dtype = DTYPES[cfg.dtype]
    if device_map is not None and not cfg.path:
        raise ValueError(
            f"device_map={device_map!r} needs an LLM loaded from a folder (llm.path); a randomly "
            "initialised LLM built from the config fields is not dispatched over devices"
        )
    if cfg.path:
        folder = _local_dir(cfg.path, "llm.path", need=("config.json",))

        def load(attn: str) -> PreTrainedModel:
            with _load_errors("llm.path", folder, "causal LM"):
                return AutoModelForCausalLM.from_pretrained(
                    str(folder),
                    local_files_only=True,
                    attn_implementation=attn,
                    trust_remote_code=cfg.trust_remote_code,
                    **({} if device_map is None else {"device_map": device_map}),
                    **{_DTYPE_KW: dtype},
                )

        model = with_attn_fallback(load, cfg.attn_implementation)
        if device_map is not None:
            log.info("LM dispatched with device_map=%r: %s", device_map, getattr(model, "hf_device_map", None))
    else:
        hf_cfg = LLM_ARCHS.build(
            cfg.arch,
            vocab_size=len(tokenizer),
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=False,
        )
        model = with_attn_fallback(
            lambda attn: AutoModelForCausalLM.from_config(hf_cfg, attn_implementation=attn, **{_DTYPE_KW: dtype}),
            cfg.attn_implementation)
        log.info("built a random %s LM: %d parameters", cfg.arch, sum(p.numel() for p in model.parameters()))

    n_embed = model.get_input_embeddings().weight.shape[0]
    if n_embed < len(tokenizer):
        log.info("resizing LM embeddings %d -> %d to fit the tokenizer", n_embed, len(tokenizer))
        grow_embeddings(model, len(tokenizer))
    if tokenizer.pad_token_id is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id

    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """Non-reentrant activation checkpointing of the decoder layers; turns the KV cache off.

    With `use_reentrant=False` the checkpointed layers get gradients even when their inputs do not
    require grad, so frozen embeddings + LoRA train without extra hooks. transformers still
    registers its `enable_input_require_grads` hook on the input embeddings (harmless here).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def embed_tokens(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Input embeddings of `input_ids` [B, L] -> [B, L, Dl], for a plain or PEFT-wrapped LM."""
    return model.get_input_embeddings()(input_ids)


# ------------------------------------------------------------------------------------------------
# LoRA


def apply_lora(model: PreTrainedModel, lora: LoRAConfig) -> PeftModel:
    """Wrap `model` with a LoRA adapter on `lora.target_modules` (matched by module-name suffix,
    as peft does; "auto": every linear layer type of the family but the head, model/llm_family.py;
    a name matching no module is a ConfigError). Only the adapter weights are left trainable."""
    found = lora_targets(model, lora.target_modules)
    peft_cfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=found,
    )
    with warnings.catch_warnings():
        # peft 0.21 reads the property transformers 5 deprecated (`is_gradient_checkpointing`)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_cfg)


def has_lora(model: nn.Module) -> bool:
    return isinstance(model, PeftModel)


def unwrap_base(model: nn.Module) -> nn.Module:
    """The underlying transformers model (for a PeftModel: still holding the injected LoRA layers)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA weights into the base layers and drop the PEFT wrapper (in place). A model
    without an adapter is returned unchanged."""
    if not isinstance(model, PeftModel):
        return model
    return model.merge_and_unload()


# ------------------------------------------------------------------------------------------------
# text encoder for TG-IS (tgis.text_source == "hf")


class TextEncoder(nn.Module):
    """A local HF encoder (AutoModel + AutoTokenizer from the folder `path`).

    forward(list of B strings) -> [B, out_dim]: the last hidden state pooled over the real tokens
    ("mean": masked mean; "cls": the first token; "pooler": the model's `pooler_output`, e.g.
    BERT's tanh-dense [CLS], which Med-2E3's TG-IS reads). Frozen by default: its weights do not require
    grad, it stays in eval mode and runs without autograd.
    """

    def __init__(self, path: str, out_pooling: str = "mean", max_length: int = 128, trainable: bool = False) -> None:
        super().__init__()
        if out_pooling not in ("mean", "cls", "pooler"):
            raise ValueError(f"TextEncoder out_pooling must be 'mean', 'cls' or 'pooler', got {out_pooling!r}")
        if max_length < 1:
            raise ValueError(f"TextEncoder max_length must be >= 1, got {max_length}")
        folder = _local_dir(path, "tgis.text_encoder", need=("config.json",))
        with _load_errors("tgis.text_encoder", folder, "text encoder and tokenizer"):
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.encoder, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        bad = {k: list(info.get(k) or []) for k in ("missing_keys", "mismatched_keys")}
        if any(bad.values()):  # never a silently half-random text tower
            raise ConfigError(f"tgis.text_encoder: the weights in {folder} do not fit its config.json: "
                              f"missing {bad['missing_keys'][:20]}, mismatched {bad['mismatched_keys'][:20]}")
        self.out_pooling = out_pooling
        self.max_length = max_length
        self.out_dim = int(self.encoder.config.hidden_size)
        self.trainable = trainable
        self.encoder.requires_grad_(trainable)
        if not trainable:
            self.encoder.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        if not self.trainable:
            self.encoder.eval()
        return self

    def forward(self, texts: list[str]) -> torch.Tensor:
        if isinstance(texts, str) or not texts:
            raise ValueError("TextEncoder expects a non-empty list of strings")
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.encoder(**batch)
        if self.out_pooling == "pooler":
            if getattr(out, "pooler_output", None) is None:
                raise ValueError("tgis.text_pooling 'pooler': the text encoder has no pooler_output")
            return out.pooler_output  # [B, H]
        hidden = out.last_hidden_state  # [B, L, H]
        if self.out_pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
