"""Training compute of a configuration, counted from the batches a run actually sees.

A batch of B users with real (jagged) lengths n_1..n_B has T = sum(n) tokens,
S = sum(n (n + 1) / 2) causal (query, key) pairs (the diagonal included: the
causal half of each user's own square, never the padded batch maximum) and P
positions with a target. One multiply-add is 2 FLOPs. Forward, per batch:

    embeddings      2 T D                      item vector * sqrt(D) + position (the lookups are gathers)
    HSTU layer      2 T D 2H(dqk + dv)         f1, the UVQK projection
                    2 S H (dqk + dv)           Q K^T and A V over the causal pairs
                    S H                        + rab (relative bias), when the model has one
                    2 T H dv D                 f2, the output projection
    SASRec layer    2 T D (3D + D + 2F)        Q/K/V and output projections, the FFN
                    4 S D                      Q K^T and A V (H heads of D/H)
    loss            2 P (K + 1) D              the target and K negatives scored per position

Training = forward + backward = 3 x forward: every product is needed once more for the
gradient of its input and once for that of its weight (the same rule as the 6N-per-token
count of the scaling-law literature). Norms, activations, softmax and bias vectors are
elementwise and left out, as in that literature; what is counted are the terms whose cost
grows with width, depth, length and negatives. tests/test_flops.py checks the terms by
hand and the matrix products against torch.utils.flop_counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import ExperimentConfig
from ..model import dlrm

BACKWARD_FACTOR = 2  # backward = 2 x forward (input and weight gradients)


@dataclass(frozen=True)
class FlopModel:
    """The per-token, per-pair and per-target coefficients of one model configuration."""

    kind: str  # "hstu" or "sasrec"; a new family (e.g. the DLRM-style ranker) adds its terms in `forward`
    dim: int
    num_blocks: int
    num_heads: int
    qk_dim: int  # per head
    v_dim: int  # per head
    ffn_dim: int
    num_negatives: int
    relative_bias: bool

    @classmethod
    def from_config(cls, experiment: ExperimentConfig) -> "FlopModel":
        m = experiment.model
        heads = m.num_heads
        kind = "hstu" if m.kind == "gr" else m.kind  # generative ranking: the HSTU stack over interleaved tokens
        return cls(kind=kind, dim=m.dim, num_blocks=m.num_blocks, num_heads=heads,
                   qk_dim=m.qk_dim or m.dim // heads, v_dim=m.v_dim or m.dim // heads, ffn_dim=m.ffn_dim or m.dim,
                   # columns of negatives each target is scored against: mixed draws from both pools
                   num_negatives=experiment.train.num_negatives * (2 if experiment.train.negatives == "mixed" else 1),
                   relative_bias=getattr(m, "relative_bias", "both") != "none")  # an HSTU ablation option

    def forward(self, lengths, num_targets: int) -> dict[str, float]:
        """Forward FLOPs of one batch by component; lengths: the users' real lengths."""
        n = np.asarray(lengths, dtype=np.float64)
        T, S, P = n.sum(), (n * (n + 1) / 2).sum(), float(num_targets)
        D, L, H, dqk, dv = self.dim, self.num_blocks, self.num_heads, self.qk_dim, self.v_dim
        if self.kind == "hstu":
            projections = L * (2 * T * D * 2 * H * (dqk + dv) + 2 * T * H * dv * D)
            attention = L * 2 * S * H * (dqk + dv)
            bias = L * S * H if self.relative_bias else 0.0
        elif self.kind == "sasrec":
            projections = L * 2 * T * D * (3 * D + D + 2 * self.ffn_dim)
            attention = L * 4 * S * D
            bias = 0.0
        elif self.kind == "dlrm":  # genrec.model.dlrm on its items (about T / 2 tokens, S / 4 pairs)
            items, pairs, Ha, Hm = T / 2, S / 4, dlrm.ATTENTION_HIDDEN, dlrm.MLP_HIDDEN
            projections = items * (2 * D * Ha + 2 * (6 * D * Hm + Hm * Hm // 2))  # the DIN unit's target term, the MLP
            attention = pairs * (2 * Ha * D + 2 * Ha + 2 * D)  # per (item, earlier item): z, its weight, the sum
            bias = 0.0
        else:
            raise ValueError(f"no FLOP count for model.kind {self.kind!r} (add its terms to FlopModel.forward)")
        return {"embeddings": 2 * T * D, "projections": projections, "attention": attention,
                "relative_bias": bias, "loss": 2 * P * (self.num_negatives + 1) * D}

    def training(self, lengths, num_targets: int) -> float:
        """Forward + backward FLOPs of one training step on this batch."""
        return (1 + BACKWARD_FACTOR) * sum(self.forward(lengths, num_targets).values())

    def batch(self, offsets, target_ids) -> float:
        """Training FLOPs of a jagged torch batch (offsets [B+1], target_ids [T], 0 = no target)."""
        return self.training(np.diff(offsets.cpu().numpy()), int((target_ids > 0).sum()))
