"""Jagged batches: the values of B sequences concatenated into one [T, ...] tensor
plus `offsets` [B+1] (offsets[0] = 0, offsets[-1] = T); sequence b is
values[offsets[b]:offsets[b+1]]. These helpers move between that layout and a
padded [B, L, ...] one, where L is the batch's own longest sequence (never the
global maximum N). All of them are vectorised: no Python loop over users.
"""

import torch


def lengths_from_offsets(offsets: torch.Tensor) -> torch.Tensor:
    """[B+1] offsets -> [B] sequence lengths."""
    return offsets[1:] - offsets[:-1]


def max_length(offsets: torch.Tensor) -> int:
    """The batch's longest sequence (0 for an empty batch)."""
    lengths = lengths_from_offsets(offsets)
    return int(lengths.max()) if lengths.numel() else 0


def positions_in_sequence(offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[T] index of each token within its own sequence: 0, 1, ..., n_b - 1 per user."""
    starts = offsets[:-1].repeat_interleave(lengths_from_offsets(offsets), output_size=num_tokens)
    return torch.arange(num_tokens, device=offsets.device) - starts


def concat_ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Concatenation of arange(s, s + l) for each (s, l): a vectorised gather index."""
    ends = lengths.cumsum(0)
    total = int(ends[-1]) if ends.numel() else 0
    return (starts - ends + lengths).repeat_interleave(lengths, output_size=total) + torch.arange(
        total, device=starts.device)


def padded_index(offsets: torch.Tensor, num_tokens: int, padded_length: int) -> torch.Tensor:
    """[T] row of each token in the flattened [B * padded_length] padded layout."""
    lengths = lengths_from_offsets(offsets)
    user = torch.arange(lengths.numel(), device=offsets.device)
    user = user.repeat_interleave(lengths, output_size=num_tokens)
    return user * padded_length + positions_in_sequence(offsets, num_tokens)


def padding_mask(offsets: torch.Tensor, padded_length: int) -> torch.Tensor:
    """[B, L] bool, True where the padded layout holds a real token."""
    positions = torch.arange(padded_length, device=offsets.device)
    return positions.unsqueeze(0) < lengths_from_offsets(offsets).unsqueeze(1)


def jagged_to_padded(
    values: torch.Tensor,
    offsets: torch.Tensor,
    padded_length: int,
    padding_value: float = 0.0,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """[T, ...] jagged -> [B, padded_length, ...] padded (differentiable).

    `index` is `padded_index(offsets, T, padded_length)`; pass it when converting
    several tensors of one batch so it is computed once.
    """
    if index is None:
        index = padded_index(offsets, values.size(0), padded_length)
    batch_size = offsets.numel() - 1
    rows = values.new_full((batch_size * padded_length, *values.shape[1:]), padding_value)
    return rows.index_copy(0, index, values).view(batch_size, padded_length, *values.shape[1:])


def padded_to_jagged(
    padded: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, L, ...] padded -> [T, ...] jagged, dropping the padding (differentiable)."""
    rows = padded.flatten(0, 1)
    if index is None:
        index = padded_index(offsets, int(offsets[-1]), padded.size(1))
    return rows.index_select(0, index)
