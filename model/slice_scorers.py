"""TG-IS slice scorers (registry `SCORERS`, built as SCORERS.build(name, cfg, dim)):
(z [B, S, D], t [B, D], mask [B, S] bool[, context [B, S, F]]) -> logits [B, S] float32, where
z are the slice descriptors, t = text_proj(question) (model/tgis.py) and context the batch's
data-side per-slice features (`Batch.slice_context`, data/select/context.py), passed only when
the batch carries them (the data side computes them only for a scorer that reads them).

    med2e3    Med-2E3's head, z_j . t / tau (no parameters; ignores context)
    context   text term on the volume-normalised z + a question-gated cross-slice term
              (`ContextScorer`); with `tgis.context_features: intensity` the cross-slice term
              reads `context` (`reads_context`): the Vote-MI teacher's own intensity features,
              computed on the data side, never here (docs/distillation.md §4).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from medvlm3d.data.errors import ConfigError, DataError
from medvlm3d.data.select.context import CONTEXT_FEATURES, INTENSITY_TEMPS, soft_relations, volume_normalised
from torch import nn

from medvlm3d.registry import Registry

if TYPE_CHECKING:
    from medvlm3d.model.tgis import TGISConfig

SCORERS = Registry("slice scorer")
__all__ = ["SCORERS", "ContextScorer", "Med2E3Scorer", "INTENSITY_TEMPS", "volume_normalised"]


class Med2E3Scorer(nn.Module):
    """Med-2E3's head: logits_j = (z_j . t) / tau. No parameters (t's map is TGIS.text_proj)."""

    def __init__(self, cfg: TGISConfig, dim: int) -> None:
        super().__init__()
        self.tau = float(cfg.tau)

    def forward(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        return torch.einsum("bsd,bd->bs", z.float(), t.float()) / self.tau


@SCORERS.register("med2e3")
def _med2e3(cfg: TGISConfig, dim: int) -> nn.Module:
    return Med2E3Scorer(cfg, dim)


class ContextScorer(nn.Module):
    """logits_j = (c_j . t) / tau + g(t) * context_j, c = volume_normalised(z).

    - text term: Med-2E3's z_j . t / tau up to a per-volume shift (which the softmax ignores)
      and the per-volume scale 1 / rms, so the question's steer is not drowned by the slices'
      likeness (`normalise_text=False`: Med-2E3's term on z as it is);
    - context term: an MLP over [soft in-votes_j, soft density_j] of h = W c, where the in-votes
      (how many slices find j among their nearest: a softmax over the cosine similarities of the
      h) and the density (logsumexp of j's similarities) tell "representative of the rest", which
      no function of z_j alone can (`use_h=True`: the MLP also reads h_j; fitted the Vote-MI
      teacher worse on the demo, docs/distillation.md); with `tgis.context_features: intensity`
      the MLP reads the batch's `context` [B, S, CONTEXT_FEATURES] instead: the same in-votes and
      density on the slices' intensity features at INTENSITY_TEMPS, plus vote-k's votes and picks,
      all computed on the data side (data/select/context.py);
    - gate g(t) = softplus(a . t + b), the question decides how much the prior counts.
    The MLP's output layer starts at zero: a new head scores like its text term alone.
    """

    def __init__(self, cfg: TGISConfig, dim: int, hidden: int = 64, temp: float = 0.1,
                 normalise_text: bool = True, use_h: bool = False) -> None:
        super().__init__()
        self.tau = float(cfg.tau)
        self.temp = temp
        self.normalise_text, self.use_h = normalise_text, use_h
        self.reads_context = cfg.context_features == "intensity"
        # tokens: a learned metric h = W c at one temperature; intensity: the teacher's own
        # cosine (no projection: 2*3 scalars per slice, nothing to over-fit) at three temperatures
        # and vote-k's (votes, picks), all in the data-side context [B, S, CONTEXT_FEATURES]
        self.proj = None if self.reads_context else nn.Linear(dim, hidden)
        self.temps = INTENSITY_TEMPS if self.reads_context else (temp,)
        if use_h and self.proj is None:
            raise ConfigError("tgis.context_features=intensity has no learned h for use_h to read")
        n_in = CONTEXT_FEATURES if self.reads_context else hidden * use_h + 2 * len(self.temps)
        self.mlp = nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(math.e - 1.0))  # softplus -> 1

    relations = staticmethod(soft_relations)  # (hn [B, S, H], mask, temp) -> (in-votes, density) [B, S]

    def context(self, c: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, S] float32 context logits from the normalised descriptors c [B, S, D] (tokens)."""
        h = c.float() if self.proj is None else self.proj(c.to(self.gate.weight.dtype)).float()  # [B, S, H]
        hn = nn.functional.normalize(h, dim=-1)
        rel = [x.unsqueeze(-1) for temp in self.temps for x in self.relations(hn, mask, temp)]
        return self.head(torch.cat([h] * self.use_h + rel, dim=-1))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP on per-slice inputs x [B, S, E] -> [B, S] float32 (the head may be bf16)."""
        return self.mlp(nn.functional.gelu(x.float()).to(self.gate.weight.dtype)).squeeze(-1).float()

    def forward(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, S, D], t [B, D], mask [B, S]; context [B, S, CONTEXT_FEATURES] (the batch's
        slice_context), needed when the cross-slice term reads intensity features."""
        c = volume_normalised(z.float(), mask)
        text = torch.einsum("bsd,bd->bs", c if self.normalise_text else z.float(), t.float()) / self.tau
        gate = nn.functional.softplus(self.gate(t.to(self.gate.weight.dtype)).float())  # [B, 1]
        if not self.reads_context:
            return text + gate * self.context(c, mask)
        want = (*mask.shape, CONTEXT_FEATURES)
        if context is None:
            raise DataError("tgis.scorer=context with context_features=intensity reads the batch's slice_context "
                            f"{list(want)} (data-side features): build samples with study_tensors(study, "
                            "SelectionPlan.from_config(cfg.model)), data/select/step.py")
        if tuple(context.shape) != want:
            raise DataError(f"slice_context must be {list(want)}, got {list(context.shape)}")
        return text + gate * self.head(context.to(text.device) * mask.unsqueeze(-1))


@SCORERS.register("context")
def _context(cfg: TGISConfig, dim: int, **kwargs: Any) -> nn.Module:
    return ContextScorer(cfg, dim, **kwargs)
