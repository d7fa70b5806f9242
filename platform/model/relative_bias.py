"""rab^{p,t}, the relative attention bias of HSTU's Eq. (2), written once:

    rab(i, j)    = position_weights[rel(i, j)] + time_weights[bucket(i, j)]
    rel(i, j)    = clamp(N - 1 + p(j) - p(i), 0, 2N - 2)
    bucket(i, j) = clamp(floor(ln(max(|target_ts[i] - ts[j]|, 1)) / 0.301), 0, 128)

shared by all heads, one pair of tables per layer. p(i) is the position of token i
(its index; M-FALCON's candidates all sit at the position right after the history),
N the number of positions the model is built for, and target_ts[i] the time of what
position i predicts (ts[i+1], or the request time at the last position): the bias
sees how long before the prediction each key happened.

Both terms are summed into one [129, 2N - 1] table (`bias_table`) and a (query, key)
pair indexes it (`bias_table_index`), so a bias is a single lookup. Every attention
path takes these two: the plain one, the tiled CPU op, the reference op and M-FALCON;
the Triton kernel computes the same index inside (it cannot call torch).
"""

import torch
import torch.nn as nn

from .jagged import jagged_to_padded, padded_index
from .ops.table_lookup import table_lookup

NUM_TIME_BUCKETS = 128
TIME_BUCKET_LOG_WIDTH = 0.301  # buckets of ln(seconds): each is e^0.301 ~ 1.35x wider than the last


def time_buckets(target_ts: torch.Tensor, ts: torch.Tensor, max_bucket: int) -> torch.Tensor:
    """Broadcast bucket of |target_ts - ts| (int64 Unix seconds) as int64.

    The gap is exact in int64 and rounded once to float32; every implementation
    must take these same steps so that gaps near a bucket edge land alike.
    ln(gap) >= 0, so truncating to long is the floor. (In place: [B, L, L] is large.)
    """
    gap = (target_ts - ts).abs_().float()
    return gap.clamp_(min=1).log_().div_(TIME_BUCKET_LOG_WIDTH).clamp_(max=max_bucket).long()


def bias_table_index(query_positions: torch.Tensor, key_positions: torch.Tensor, target_timestamps: torch.Tensor,
                     timestamps: torch.Tensor, num_positions: int, num_time_buckets: int) -> torch.Tensor:
    """Index of each (query, key) pair into the flattened `bias_table`: bucket * (2N - 1) + rel.

    Arguments broadcast: query_positions and target_timestamps describe the queries,
    key_positions and timestamps the keys; target_timestamps against timestamps must
    already have the full broadcast shape (the bucket tensor is the result, in place)."""
    width = 2 * num_positions - 1
    relative = (num_positions - 1 + key_positions - query_positions).clamp_(0, width - 1)
    return time_buckets(target_timestamps, timestamps, num_time_buckets).mul_(width).add_(relative)


def bias_table(position_weights: torch.Tensor, time_weights: torch.Tensor) -> torch.Tensor:
    """[(num_time_buckets + 1) * (2N - 1)]: every (time bucket, relative position) bias sum, flattened."""
    return (time_weights.unsqueeze(1) + position_weights.unsqueeze(0)).flatten()


class RelativeBucketedTimeAndPositionBias(nn.Module):
    """The learned tables of rab: a scalar per relative position (2N - 1 of them) and
    one per log-bucketed time gap (129). terms "position" or "time" keeps one of the
    two (the paper's ablations; the other term is then zero)."""

    def __init__(self, num_positions: int, num_time_buckets: int = NUM_TIME_BUCKETS, terms: str = "both") -> None:
        super().__init__()
        if terms not in ("both", "position", "time"):
            raise ValueError(f"relative bias terms must be 'both', 'position' or 'time', got {terms!r}")
        self.num_positions, self.num_time_buckets = num_positions, num_time_buckets
        self.position_weights = nn.Parameter(torch.empty(2 * num_positions - 1).normal_(0, 0.02)) \
            if terms != "time" else None
        self.time_weights = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(0, 0.02)) \
            if terms != "position" else None

    def table(self) -> torch.Tensor:
        """`bias_table` of this layer's terms (a missing term counts as zeros)."""
        some = self.position_weights if self.position_weights is not None else self.time_weights
        position = some.new_zeros(2 * self.num_positions - 1) if self.position_weights is None \
            else self.position_weights
        time = some.new_zeros(self.num_time_buckets + 1) if self.time_weights is None else self.time_weights
        return bias_table(position, time)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """index [...] from `bias_table_index` -> rab [...]. One gather from the small table
        (and in the backward one scatter into it)."""
        return table_lookup(self.table(), index)


def relative_bias_index(timestamps: torch.Tensor, target_timestamps: torch.Tensor, offsets: torch.Tensor,
                        padded_length: int, num_positions: int,
                        num_time_buckets: int = NUM_TIME_BUCKETS) -> torch.Tensor:
    """`bias_table_index` of every (query i, key j) of a jagged batch padded to
    padded_length L: [B, L, L], with p(i) = i."""
    index = padded_index(offsets, timestamps.size(0), padded_length)
    ts = jagged_to_padded(timestamps, offsets, padded_length, index=index)
    target_ts = jagged_to_padded(target_timestamps, offsets, padded_length, index=index)
    position = torch.arange(padded_length, device=offsets.device)
    return bias_table_index(position.unsqueeze(1), position.unsqueeze(0), target_ts.unsqueeze(2), ts.unsqueeze(1),
                            num_positions, num_time_buckets)
