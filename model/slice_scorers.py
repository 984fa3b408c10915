"""TG-IS slice scorers (registry `SCORERS`): (z [B, S, D], t [B, D], mask [B, S] bool) -> logits
[B, S] float32, where z are the slice descriptors and t = text_proj(question) (model/tgis.py).

    med2e3    Med-2E3's head, z_j . t / tau (no parameters)
    context   text term on the volume-normalised z + a question-gated cross-slice term
              (`ContextScorer`); with `tgis.context_features: intensity` the cross-slice term
              reads the Vote-MI teacher's own intensity features of the slices [B, S, 1, h, w]
              (`reads_slices`: TGIS passes the slices and slice_plane), docs/distillation.md §4.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from medvlm3d.data.errors import ConfigError
from medvlm3d.data.select.base import VoteMIConfig
from medvlm3d.data.select.votek import VoteMI, intensity_features
from torch import nn

from medvlm3d.registry import Registry

if TYPE_CHECKING:
    from medvlm3d.model.tgis import TGISConfig

SCORERS = Registry("slice scorer")
INTENSITY_TEMPS = (0.03, 0.1, 0.3)  # the context scorer's cosine temperatures on intensity features


class Med2E3Scorer(nn.Module):
    """Med-2E3's head: logits_j = (z_j . t) / tau. No parameters (t's map is TGIS.text_proj)."""

    def __init__(self, cfg: TGISConfig, dim: int) -> None:
        super().__init__()
        self.tau = float(cfg.tau)

    def forward(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsd,bd->bs", z.float(), t.float()) / self.tau


@SCORERS.register("med2e3")
def _med2e3(cfg: TGISConfig, dim: int, vote_mi: VoteMIConfig | None = None) -> nn.Module:
    return Med2E3Scorer(cfg, dim)


def volume_normalised(z: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """c [B, S, D]: (z_j - mean of the volume's real slices) / their rms spread; 0 on padding.

    Mean-pooled descriptors differ little from slice to slice (|z_j - mean z| ~ 1% of |z| on the
    phantoms, docs/distillation.md): this is what is left of them once the volume is taken out.
    """
    m = mask.unsqueeze(-1).to(z.dtype)
    n = m.sum(1, keepdim=True).clamp_min(1.0)
    c = (z - (z * m).sum(1, keepdim=True) / n) * m
    rms = (c.pow(2).sum((1, 2), keepdim=True) / (n * z.shape[-1])).sqrt()
    return c / (rms + eps)


class ContextScorer(nn.Module):
    """logits_j = (c_j . t) / tau + g(t) * context_j, c = volume_normalised(z).

    - text term: Med-2E3's z_j . t / tau up to a per-volume shift (which the softmax ignores)
      and the per-volume scale 1 / rms, so the question's steer is not drowned by the slices'
      likeness (`normalise_text=False`: Med-2E3's term on z as it is);
    - context term: an MLP over [soft in-votes_j, soft density_j] of h = W c, where the in-votes
      (how many slices find j among their nearest: a softmax over the cosine similarities of the
      h) and the density (logsumexp of j's similarities) tell "representative of the rest", which
      no function of z_j alone can (`use_h=True`: the MLP also reads h_j; fitted the Vote-MI
      teacher worse on the demo, docs/distillation.md);
    - gate g(t) = softplus(a . t + b), the question decides how much the prior counts.
    The MLP's output layer starts at zero: a new head scores like its text term alone.
    """

    def __init__(self, cfg: TGISConfig, dim: int, hidden: int = 64, temp: float = 0.1,
                 normalise_text: bool = True, use_h: bool = False, vote_mi: VoteMIConfig | None = None) -> None:
        super().__init__()
        self.tau = float(cfg.tau)
        self.temp = temp
        self.normalise_text, self.use_h = normalise_text, use_h
        self.vote_mi = VoteMI(vote_mi or VoteMIConfig())
        self.on_intensity = self.reads_slices = cfg.context_features == "intensity"
        # tokens: a learned metric h = W c at one temperature; intensity: the teacher's own
        # cosine (no projection: 2*3 scalars per slice, nothing to over-fit) at three temperatures
        self.proj = None if self.on_intensity else nn.Linear(dim, hidden)
        self.temps = INTENSITY_TEMPS if self.on_intensity else (temp,)
        if use_h and self.proj is None:
            raise ConfigError("tgis.context_features=intensity has no learned h for use_h to read")
        self.mlp = nn.Sequential(nn.Linear(hidden * use_h + 2 * len(self.temps) + 2 * self.on_intensity, hidden), nn.GELU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.gate = nn.Linear(dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(math.e - 1.0))  # softplus -> 1

    @staticmethod
    def relations(hn: torch.Tensor, mask: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit vectors hn [B, S, H] -> (soft in-votes [B, S], soft density [B, S]) at `temp`."""
        sim = torch.einsum("bjh,bkh->bjk", hn, hn) / temp
        eye = torch.eye(sim.shape[-1], dtype=torch.bool, device=sim.device)
        pair = mask.unsqueeze(1) & mask.unsqueeze(2) & ~eye
        sim = sim.masked_fill(~pair, float("-inf"))
        has_other = pair.any(-1, keepdim=True)  # a single-slice volume has no neighbours
        vote = torch.where(has_other, torch.softmax(sim, dim=-1), torch.zeros_like(sim))  # [B, voter k, j]
        votes = vote.sum(1) * mask  # [B, S]: soft count of the slices that vote for j
        density = torch.where(has_other.squeeze(-1), torch.logsumexp(sim, dim=-1), torch.zeros_like(votes)) * temp
        return votes, density * mask

    def context(self, c: torch.Tensor, mask: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S] float32 context logits from the normalised descriptors c [B, S, D] (and per-slice
        inputs `extra` [B, S, E] for the MLP)."""
        dtype = self.gate.weight.dtype  # the head may be bf16
        h = c.float() if self.proj is None else self.proj(c.to(dtype)).float()  # [B, S, H]
        hn = nn.functional.normalize(h, dim=-1)
        rel = [x.unsqueeze(-1) for temp in self.temps for x in self.relations(hn, mask, temp)]
        x = torch.cat([h] * self.use_h + rel + ([] if extra is None else [extra.float()]), dim=-1)
        return self.mlp(nn.functional.gelu(x).to(dtype)).squeeze(-1).float()

    @torch.no_grad()
    def intensity_inputs(self, slices: torch.Tensor, mask: torch.Tensor,
                         plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slices [B, S, 1, h, w] -> (the teacher's intensity features [B, S, F], vote-k on them
        [B, S, 2]: in-votes / their max, and 1 on the picks), both without gradient."""
        feats = intensity_features(slices.float(), size=self.vote_mi.cfg.feature_size, mask=mask)
        vk = torch.zeros(*mask.shape, 2)
        for i, planes in enumerate(self.vote_mi.select(feats, mask, plane)):
            for r in planes.values():
                vk[i, :, 0] += (r.votes / r.votes.max().clamp_min(1.0)).float()
                vk[i, r.picks, 1] = 1.0
        return feats, vk.to(feats.device)

    def forward(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, slices: torch.Tensor | None = None,
                slice_plane: torch.Tensor | None = None) -> torch.Tensor:
        """z [B, S, D], t [B, D], mask [B, S]; slices [B, S, 1, h, w] in [0, 1] (and slice_plane
        [B, S], default all axial), needed when the context term reads the intensity features."""
        if not self.on_intensity:
            return self.scores_from(z, t, mask)
        if slices is None:
            raise ValueError("ContextScorer: tgis.context_features=intensity needs the slices [B, S, 1, h, w]")
        plane = torch.zeros_like(mask, dtype=torch.long) if slice_plane is None else slice_plane
        return self.scores_from(z, t, mask, *self.intensity_inputs(slices, mask, plane))

    def scores_from(self, z: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                    feats: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """The logits with the context term on `feats` [B, S, F] (None: on the descriptors z)."""
        c = volume_normalised(z.float(), mask)
        text = torch.einsum("bsd,bd->bs", c if self.normalise_text else z.float(), t.float()) / self.tau
        gate = nn.functional.softplus(self.gate(t.to(self.gate.weight.dtype)).float())  # [B, 1]
        ctx = c if feats is None else volume_normalised(feats.float(), mask)
        return text + gate * self.context(ctx, mask, extra)


@SCORERS.register("context")
def _context(cfg: TGISConfig, dim: int, **kwargs: Any) -> nn.Module:
    return ContextScorer(cfg, dim, **kwargs)
