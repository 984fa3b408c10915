"""The composite model: encode a volume two ways, score the slices by the question, splice the
visual tokens into a Hugging Face causal LM.

One training step (N images over B samples; S slices per image, padded; T tokens per slice):

    encoder3d(volumes [N,1,D,H,W])            -> [N, N3, D3]  -> Projector3D -> x3d [N, N3', Dl]
    slice_encoder(slices [N,S,1,h,w], mask)   -> [N, S, T, D2] (-> InterSlice) -> Projector2D -> v [N,S,T,Dl]
    text feature of the question              -> t [N, Dt]
    TGIS(x3d, grid, v, t, pos, plane, mask)   -> scores s [N, S] (sum 1 over real slices), z2d [N, T, Dl]
    teacher q [N, S], slice_keep [N, P],
    slice_context [N, S, F]                   from the batch: computed on the data side (data/select/)
    visual tokens per variant:
        2e3, 2e3_interslice: [x3d ; z2d]      -> [N, N3' + T, Dl]
        3d_only:             x3d              -> [N, N3', Dl]
        2d_only:             v at slice_keep  -> [N, num_picks * T, Dl]
        2d_interslice:       v of every slice -> [N, S * T, Dl]  (MS-VLM: slice encoder, then one
                             inter-slice transformer over all slices of all images of a sample,
                             with plane and series / phase embeddings; no 3D branch, no TG-IS)
    With model.preselect_k = k the data side already cut slices to [N, k, 1, h, w] (S = k).
    The prompt holds `num_visual_tokens` copies of the <image> token per image (see data/prompts.py);
    those positions of inputs_embeds are overwritten, in order, by the visual tokens.
    LLM(inputs_embeds, attention_mask, labels) -> logits [B, L, V], LM loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from einops import rearrange, repeat
from torch import nn

from medvlm3d.config import ConfigError, RunConfig
from medvlm3d.data.batch import Batch
from medvlm3d.model.encoder3d import build_encoder3d, load_encoder3d_weights
from medvlm3d.model.feature_cache import FeatureCache, check_cacheable, row_keys
from medvlm3d.model.inter_slice import InterSlice, joint_over_images
from medvlm3d.model.llm import TextEncoder, apply_lora, build_llm, embed_tokens, load_tokenizer
from medvlm3d.model.llm_family import embedding_rms
from medvlm3d.model.projector import Projector2D, Projector3D
from medvlm3d.model.slice_encoder import SliceEncoder
from medvlm3d.model.tgis import TGIS
from medvlm3d.model.trainable import apply_trainable_policy, hold_frozen_in_eval

log = logging.getLogger(__name__)


@dataclass
class VisualOutput:
    """Visual tokens of N images and what the slice heads said about them."""

    tokens: torch.Tensor  # [N, Nv, Dl]
    scores: torch.Tensor | None = None  # [N, S] TG-IS scores (None for 3d_only / 2d_only)
    logits: torch.Tensor | None = None  # [N, S] TG-IS logits before the softmax
    teacher: torch.Tensor | None = None  # [N, S] the batch's teacher distribution (passed through)
    picks: torch.Tensor | None = None  # [N, num_picks] the batch's slice_keep (2d_only)


@dataclass
class MedVLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # [B, L, V]
    scores: torch.Tensor | None = None  # [N, S]
    slice_logits: torch.Tensor | None = None  # [N, S]
    teacher: torch.Tensor | None = None  # [N, S]
    slice_mask: torch.Tensor | None = None  # [N, S]
    extras: dict[str, Any] = field(default_factory=dict)


class MedVLM(nn.Module):
    """3D + 2D encoders, TG-IS head, projectors and a (LoRA) causal LM.

    Args:
        cfg: the run config; `cfg.model` picks the variant and every component, `cfg.data` the
            input sizes (the 3D encoder's `img_size` is derived from `cfg.data.size`).
        tokenizer: a tokenizer holding the `<image>` token (see `model.llm.load_tokenizer`).
        llm: an already built LM (e.g. restored from a checkpoint, adapter included); when None it
            is built from `cfg.model.llm` and wrapped with LoRA if the policy says `lora`.
        load_external_weights: load encoder weights from the paths in the config (off when a
            checkpoint supplies them).
    """

    def __init__(
        self,
        cfg: RunConfig,
        tokenizer: Any,
        llm: nn.Module | None = None,
        load_external_weights: bool = True,
        text_encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        mc = cfg.model
        self.cfg = cfg
        self.variant = mc.variant
        self.tokenizer = tokenizer
        self.image_token_id = int(tokenizer.convert_tokens_to_ids("<image>"))
        if llm is None:
            llm = build_llm(mc.llm, tokenizer)
            if mc.trainable.llm == "lora":
                llm = apply_lora(llm, mc.llm.lora)
        self.llm = llm
        probe = torch.zeros(1, 1, dtype=torch.long, device=self.embed_device)
        width = int(embed_tokens(self.llm, probe).shape[-1])
        self.width = width
        # projector.out_norm starts visual tokens at the scale of what the embedding module gives
        # the LLM (Gemma scales its table by sqrt(hidden) in there); 1.0 on meta (a size estimate)
        embed_rms = embedding_rms(self.llm) if mc.projector.out_norm else 1.0

        uses_3d = self.variant in ("2e3", "2e3_interslice", "3d_only")
        uses_2d = self.variant in ("2e3", "2e3_interslice", "2d_only", "2d_interslice")
        self.encoder3d = self.projector3d = None
        self.slice_encoder = self.projector2d = self.inter_slice = self.tgis = None
        self.text_encoder = None
        if uses_3d:
            self.encoder3d = build_encoder3d(mc.encoder3d)
            if load_external_weights and mc.encoder3d.weights:
                load_encoder3d_weights(self.encoder3d, mc.encoder3d.weights, mc.encoder3d.weights_key_map)
            self.projector3d = Projector3D(mc.projector, self.encoder3d.out_dim, self.encoder3d.grid, width,
                                           out_scale=embed_rms)
        if uses_2d:
            self.slice_encoder = SliceEncoder(mc.slice_encoder, tuple(cfg.data.slice_size), load_weights=load_external_weights)
            if self.variant in ("2e3_interslice", "2d_interslice"):
                self.inter_slice = InterSlice(mc.inter_slice, self.slice_encoder.out_dim)
            if self.variant == "2d_interslice":
                _ = self.slices_per_image  # a ConfigError now, not at the first batch
            self.projector2d = Projector2D(mc.projector, self.slice_encoder.out_dim, width, out_scale=embed_rms)
        if self.variant in ("2e3", "2e3_interslice"):
            text_dim = width
            if mc.tgis.text_source == "hf":  # `text_encoder`: a given tower (meta-device sizing)
                self.text_encoder = text_encoder or TextEncoder(mc.tgis.text_encoder, out_pooling=mc.tgis.text_pooling)
                text_dim = self.text_encoder.out_dim
            self.tgis = TGIS(mc.tgis, width, text_dim)
        apply_trainable_policy(self.components(), mc.trainable)
        self.feature_cache: FeatureCache | None = None  # enable_feature_cache; never saved
        self._cached_encoders: tuple[str, ...] = ()
        self.features: Any = None  # use_features: a model.features.FeatureStore; never saved

    # ----------------------------------------------------------------------------------------
    # structure

    def components(self) -> dict[str, nn.Module | None]:
        """The trainable-policy components (names as in `TrainablePolicy`)."""
        projector = nn.ModuleList([m for m in (self.projector3d, self.projector2d) if m is not None])
        return {
            "encoder3d": self.encoder3d,
            "slice_encoder": self.slice_encoder,
            "inter_slice": self.inter_slice,
            "tgis": self.tgis,
            "projector": projector if len(projector) else None,
            "llm": self.llm,
        }

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per image, from the config-built modules (never a constant)."""
        t2d = self.slice_encoder.num_tokens if self.slice_encoder is not None else 0
        if self.variant == "3d_only":
            return self.projector3d.num_tokens
        if self.variant == "2d_only":
            return self.cfg.model.vote_mi.num_picks * t2d
        if self.variant == "2d_interslice":
            return self.slices_per_image * t2d
        return self.projector3d.num_tokens + t2d

    @property
    def slices_per_image(self) -> int:
        """S of the 2d_interslice variant: model.preselect_k, else data.num_slices per plane."""
        k, n = int(self.cfg.model.preselect_k), int(self.cfg.data.num_slices)
        if k <= 0 and n <= 0:
            raise ConfigError("model.variant=2d_interslice feeds every slice to the LLM, so the slice count must be "
                              f"fixed: set data.num_slices > 0 or model.preselect_k > 0 (got {n} and {k})")
        return k if k > 0 else n * len(self.cfg.data.planes)

    @property
    def embed_device(self) -> torch.device:
        """The device of the LLM's input embeddings: where input ids and visual tokens meet. With
        a dispatched LLM (`load_pretrained(device_map=...)`) the other modules sit there too."""
        emb = self.llm.get_input_embeddings()
        hook_dev = getattr(getattr(emb, "_hf_hook", None), "execution_device", None)  # accelerate offload
        if hook_dev is not None:
            return torch.device("cuda", hook_dev) if isinstance(hook_dev, int) else torch.device(hook_dev)
        return emb.weight.device

    @property
    def device(self) -> torch.device:
        """Where inputs go: the LLM's input-embedding device (the encoders sit there too)."""
        return self.embed_device

    def train(self, mode: bool = True) -> MedVLM:
        """nn.Module.train, except that a frozen component's batch-norm and dropout layers stay in
        eval mode (`hold_frozen_in_eval`): a frozen encoder is a fixed function of its input."""
        super().train(mode)
        if mode:
            hold_frozen_in_eval(self.components())
        return self

    def enable_feature_cache(self, max_bytes: int) -> tuple[str, ...]:
        """Memoise the outputs of the frozen, deterministic encoders (model/feature_cache.py), up
        to `max_bytes`; returns the names of those cached. Not for ZeRO-3 (see that module)."""
        self.train(self.training)  # hold the frozen encoders' stochastic layers in eval mode
        names = []
        for name in ("encoder3d", "slice_encoder"):
            module = getattr(self, name)
            if module is None:
                continue
            why = check_cacheable(module)
            if why:
                log.info("feature cache: %s is not cached: %s", name, why)
            else:
                names.append(name)
        self._cached_encoders = tuple(names)
        self.feature_cache = FeatureCache(max_bytes) if names else None
        return self._cached_encoders

    def use_features(self, root: str) -> tuple[str, ...]:
        """Take the frozen encoders' outputs from a `medvlm3d encode` folder (model/features.py:
        `attach_features`, which refuses other weights / preprocessing, or a trainable encoder)."""
        from medvlm3d.model.features import attach_features

        self.features = attach_features(self, root)
        return self.features.names

    def _encode(self, name: str, *inputs: torch.Tensor, keys: list[bytes] | None = None) -> torch.Tensor:
        """getattr(self, name)(*inputs): from the encoded features (use_features) when they hold
        these inputs, else through the feature cache while that encoder is frozen (`keys`: the
        inputs' `row_keys`, when the caller already has them)."""
        module = getattr(self, name)
        if self.features is not None:
            stored = self.features.encode(name, *inputs)
            if stored is not None:
                return stored
        if self.feature_cache is None or name not in self._cached_encoders \
                or any(p.requires_grad for p in module.parameters()):
            return module(*inputs)
        return self.feature_cache.run(name, module, *inputs, keys=keys)

    # ----------------------------------------------------------------------------------------
    # encoding

    def text_features(
        self,
        question_ids: torch.Tensor,
        question_mask: torch.Tensor,
        questions: Sequence[str] | None,
        image_to_sample: torch.Tensor,
    ) -> torch.Tensor:
        """Question feature per image: [N, Dt]. `llm`: mean of the LM input embeddings over the
        question tokens [B, Lq]; `hf`: the pooled output of a local text encoder."""
        if self.text_encoder is not None:
            if questions is None:
                raise ValueError("tgis.text_source 'hf' needs the question strings in the batch ('questions')")
            feats = self.text_encoder(list(questions)).to(self.width_dtype)
        else:
            emb = embed_tokens(self.llm, question_ids.to(self.embed_device))  # [B, Lq, Dl]
            m = question_mask.to(device=emb.device, dtype=emb.dtype).unsqueeze(-1)
            feats = (emb * m).sum(1) / m.sum(1).clamp(min=1.0)
        return feats[image_to_sample]

    @property
    def width_dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def encode_images(
        self,
        volumes: torch.Tensor,
        slices: torch.Tensor,
        slice_mask: torch.Tensor,
        slice_pos: torch.Tensor,
        slice_plane: torch.Tensor,
        text: torch.Tensor | None,
        teacher: torch.Tensor | None = None,
        slice_keep: torch.Tensor | None = None,
        slice_series: torch.Tensor | None = None,
        image_to_sample: torch.Tensor | None = None,
        slice_context: torch.Tensor | None = None,
    ) -> VisualOutput:
        """volumes [N,1,D,H,W], slices [N,S,1,h,w], slice_mask/pos/plane [N,S], text [N,Dt],
        teacher [N,S] (the batch's, passed through), slice_keep [N,P] (2d_only's data-side picks),
        slice_series [N,S] (series / phase ids), image_to_sample [N] (2d_interslice: the images of
        a sample are read together; None = one image per sample), slice_context [N,S,F] (the
        TG-IS scorer's data-side per-slice features, data/select/context.py)
        -> VisualOutput with tokens [N, num_visual_tokens, Dl]."""
        x3d = None
        if self.encoder3d is not None:
            x3d = self.projector3d(self._encode("encoder3d", volumes))  # [N, N3', Dl]
        if self.variant == "3d_only":
            return VisualOutput(tokens=x3d)

        keys = None if self.feature_cache is None else row_keys(slices, slice_mask, slice_plane)
        feats = self._encode("slice_encoder", slices, slice_mask, keys=keys)  # [N, S, T, D2]
        if self.variant == "2d_interslice":
            owner = image_to_sample if image_to_sample is not None else torch.arange(slices.shape[0])
            feats = joint_over_images(self.inter_slice, feats, slice_pos, slice_plane, slice_mask, slice_series, owner)
        elif self.inter_slice is not None:
            feats = self.inter_slice(feats, slice_pos, slice_plane, slice_mask, series=slice_series)
        v = self.projector2d(feats)  # [N, S, T, Dl]
        if self.variant == "2d_interslice":
            if v.shape[1] != self.slices_per_image:
                raise ValueError(f"2d_interslice expects {self.slices_per_image} slices per image (data.num_slices x "
                                 f"planes, or model.preselect_k), got {v.shape[1]}")
            return VisualOutput(tokens=rearrange(v, "n s t d -> n (s t) d"), teacher=teacher)
        if self.variant == "2d_only":
            if slice_keep is None:
                raise ValueError("the 2d_only variant needs the batch's slice_keep [N, num_picks] (data-side picks: "
                                 "StudyDataset(selection=SelectionPlan.from_config(cfg.model)))")
            picks = slice_keep.to(v.device).long()
            chosen = torch.gather(v, 1, repeat(picks, "n p -> n p t d", t=v.shape[2], d=v.shape[3]))
            return VisualOutput(tokens=rearrange(chosen, "n p t d -> n (p t) d"), teacher=teacher, picks=picks)

        out = self.tgis(x3d, self.projector3d.out_grid, v, text, slice_pos, slice_plane, slice_mask,
                        slice_context=slice_context)
        tokens = torch.cat([x3d, out.z2d], dim=1)
        return VisualOutput(tokens=tokens, scores=out.scores, logits=out.logits, teacher=teacher)

    def prepare_inputs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, VisualOutput]:
        """THE input-building step of `forward` and `generate`: a Batch -> (inputs_embeds [B,L,Dl],
        attention_mask [B,L], VisualOutput). Images follow the encoders' dtype (bf16 after
        load_pretrained(dtype=...))."""
        its = batch.image_to_sample
        if its.numel() > 1 and bool((its[1:] < its[:-1]).any()):
            raise ValueError("images must be ordered by sample (image_to_sample non-decreasing)")
        text = None
        if self.tgis is not None:
            text = self.text_features(batch.question_ids, batch.question_mask, batch.questions, its)
        enc_dtype = next(p for p in self.parameters() if p.is_floating_point()).dtype
        vis = self.encode_images(
            batch.volumes.to(enc_dtype), batch.slices.to(enc_dtype), batch.slice_mask, batch.slice_pos,
            batch.slice_plane, text, teacher=batch.teacher, slice_keep=batch.slice_keep,
            slice_series=batch.slice_series, image_to_sample=its, slice_context=batch.slice_context,
        )
        embeds = self.splice(batch.input_ids, vis.tokens)
        return embeds, batch.attention_mask.to(embeds.device), vis

    def splice(self, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """inputs_embeds [B, L, Dl] with the <image> positions of input_ids [B, L] replaced, in
        order, by visual [N, Nv, Dl] (N images of the batch, ordered by sample). The result sits on
        the LLM's input-embedding device (the first device of a dispatched LLM)."""
        input_ids = input_ids.to(self.embed_device)
        embeds = embed_tokens(self.llm, input_ids)
        slots = input_ids == self.image_token_id
        n_slots, n_vis = int(slots.sum()), visual.shape[0] * visual.shape[1]
        if n_slots != n_vis:
            raise ValueError(
                f"the prompts hold {n_slots} <image> tokens but the images give {n_vis} visual tokens "
                f"({visual.shape[0]} images x {visual.shape[1]}); build prompts with "
                f"num_image_tokens=model.num_visual_tokens ({self.num_visual_tokens})"
            )
        return embeds.masked_scatter(slots.unsqueeze(-1), visual.to(device=embeds.device, dtype=embeds.dtype))

    # ----------------------------------------------------------------------------------------
    # forward and generation

    def forward(self, batch: Batch | None = None, **fields: Any) -> MedVLMOutput:
        """A `Batch` (data/batch.py), or its fields as keywords (the collator's dict: unknown keys
        raise) -> MedVLMOutput; `loss` is the LM loss when labels are given."""
        if batch is None:
            batch = Batch.from_dict(fields)
        elif fields:
            raise TypeError(f"MedVLM.forward: give a Batch or its fields, not both (got {sorted(fields)})")
        embeds, attention_mask, vis = self.prepare_inputs(batch)
        # A dispatched LLM's accelerate hooks carry the activations from layer to layer.
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=batch.labels, use_cache=False)
        return MedVLMOutput(
            loss=out.loss,
            logits=out.logits,
            scores=vis.scores,
            slice_logits=vis.logits,
            teacher=vis.teacher,
            slice_mask=batch.slice_mask,
        )

    def generate(self, volume: Any = None, prompt: str | Sequence[str] = "", **kwargs: Any) -> Any:
        """Answer `prompt` about `volume` (a path, a list of paths, or a tensor [1,D,H,W]); batched
        when both are lists. Returns a `Generation` (text + per-slice scores); see model/generation.py."""
        from medvlm3d.model.generation import generate

        return generate(self, volume=volume, prompt=prompt, **kwargs)

    def save_pretrained(self, path: str, **kwargs: Any) -> Any:
        from medvlm3d.model.checkpoint import save_pretrained

        return save_pretrained(self, path, **kwargs)


def build_model(cfg: RunConfig, tokenizer: Any = None) -> MedVLM:
    """Build a MedVLM from a run config; the tokenizer comes from `cfg.model.llm` when not given."""
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"build_model expects a RunConfig (medvlm3d.load_config(...)), got {type(cfg).__name__}")
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.model.llm)
    return MedVLM(cfg, tokenizer)
