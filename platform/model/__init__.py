"""genrec.model: HSTU and SASRec sequential encoders over jagged batches, and
their retrieval loss. Depends on torch only; fast ops live in `ops/`."""

from .embeddings import SequenceEmbedding
from .encoder import SequentialEncoder, build_encoder
from .encoder_config import EncoderConfig
from .hstu import HSTU, HSTULayer
from .jagged import (
    jagged_to_padded,
    lengths_from_offsets,
    max_length,
    padded_index,
    padded_to_jagged,
    padding_mask,
    positions_in_sequence,
)
from .losses import sample_negatives, sampled_softmax_loss
from .ops.gathered_dot import gathered_dot
from .ops.hstu_attention import hstu_attention
from .relative_bias import RelativeBucketedTimeAndPositionBias, relative_bias_index
from .sasrec import SASRec, SASRecBlock, causal_softmax_attention

__all__ = [
    "HSTU",
    "HSTULayer",
    "EncoderConfig",
    "RelativeBucketedTimeAndPositionBias",
    "SASRec",
    "SASRecBlock",
    "SequenceEmbedding",
    "SequentialEncoder",
    "build_encoder",
    "causal_softmax_attention",
    "gathered_dot",
    "hstu_attention",
    "jagged_to_padded",
    "lengths_from_offsets",
    "max_length",
    "padded_index",
    "padded_to_jagged",
    "padding_mask",
    "positions_in_sequence",
    "relative_bias_index",
    "sample_negatives",
    "sampled_softmax_loss",
]
