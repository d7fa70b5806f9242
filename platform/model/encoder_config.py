"""What shapes an encoder, in one small torch-free object that travels with a saved model."""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EncoderConfig:
    """kind "hstu" or "sasrec". Defaults are the paper's MovieLens-1M HSTU recipe
    (D=50, 2 blocks, 1 head, dqk = dv = D / heads); HSTU-large is num_blocks=8,
    num_heads=2; SASRec has an FFN of width `ffn_dim` (default D).

    num_positions sizes the position tables: the model's N (model.max_seq_len of the
    experiment config) for the items-only encoders, the token count (contexts + 2N + 1)
    for the generative recommender. `attention_normalizer` is the N of HSTU's 1/N
    (default num_positions; the paper's ML-1M code uses 211).

    The paper's ablations (its Table 2) are named options of HSTU: `attention`
    "softmax" replaces SiLU(.)/N by a causal softmax over the keys, and
    `relative_bias` keeps both rab terms, one of them, or none."""

    kind: str = "hstu"
    num_items: int = 0
    num_positions: int = 200
    dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    qk_dim: int | None = None
    v_dim: int | None = None
    ffn_dim: int | None = None
    dropout: float = 0.2
    attention_normalizer: int | None = None
    attention_impl: str = "auto"  # auto | pytorch | cpu | triton (see ops/hstu_attention.py)
    attention: str = "pointwise"  # pointwise | softmax
    relative_bias: str = "both"  # both | position | time | none

    @property
    def head_qk_dim(self) -> int:
        return self.qk_dim or self.dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.v_dim or self.dim // self.num_heads

    @property
    def normalizer(self) -> int:
        return self.attention_normalizer or self.num_positions

    @property
    def is_paper_hstu(self) -> bool:
        """The full model (pointwise attention, both bias terms): what the fused kernels implement."""
        return self.attention == "pointwise" and self.relative_bias == "both"

    def to_dict(self) -> dict:
        return asdict(self)
