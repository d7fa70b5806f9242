"""M-FALCON inference (Zhai et al., ICML 2024, Sec. 3.4) over any `HSTU` stack.

One user, a history of n tokens and m candidates. The plain target-aware contract
scores each candidate as if it alone were appended after the history: at position n,
with timestamp and target time = the request time. Run as m sequences that costs
O(m n^2 d). Here:

- the history is encoded once and each layer's keys and values are kept
  (`encode_history` -> `HistoryCache`); appended events extend them
  (`extend_history`), they are never recomputed;
- candidates go through the stack in microbatches of b_m; in every layer a
  candidate attends to the n cached history keys and to itself only, so one
  microbatch costs O(b_m n d) on top of the cached history (the paper's
  O((n + b_m)^2 d) recomputes the history per microbatch; with the cache it does not).
  `uncached_candidate_hidden` is that paper pass, kept as the baseline the cache is
  measured against.

One subtlety: the bias of query i uses target_ts[i], the time of what position i
predicts (ts[i+1], or the request time at the last position). So the last history
token's output, and from layer 2 up its keys and values, depend on the request time.
The cache holds the tokens whose next event is known ("settled", n - 1 of them) and
the last token's layer-0 input; the last token is run per request (one row against
the cache, O(n d) per layer), and settled when the next event arrives.

Everything here is inference: the stack must be in eval mode, no gradients.
Serving keeps a bounded LRU of `HistoryCache`s per user (genrec.serve.cache.UserCache).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .hstu import HSTU
from .ops.hstu_attention_cpu import AttentionPlan, hstu_attention_cpu
from .relative_bias import bias_table_index

DEFAULT_MICROBATCH = 128  # b_m: candidates per pass; bounds the [H, b_m, n] scores, not the results
QUERY_TILE = 512  # history rows encoded per pass: bounds the [H, tile, n] scores of a long history


@dataclass(frozen=True)
class HistoryCache:
    """One user's encoded history (immutable: `extend_history` returns a new one,
    so a request still reading the old one is never disturbed).

    keys[l], values[l]: [n - 1, H, dqk] / [n - 1, H, dv], layer l's keys and values
    of the settled tokens 0..n-2; timestamps [n] int64 of all n tokens;
    last_input [D]: the last token's input to layer 0 (run per request)."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    timestamps: torch.Tensor
    last_input: torch.Tensor

    @property
    def length(self) -> int:
        """n, the number of history tokens (the candidates' position index)."""
        return self.timestamps.numel()

    @property
    def nbytes(self) -> int:
        tensors = (*self.keys, *self.values, self.timestamps, self.last_input)
        return sum(t.numel() * t.element_size() for t in tensors)


def encode_history(blocks: HSTU, x: torch.Tensor, timestamps: torch.Tensor) -> HistoryCache:
    """x [n, D] (the stack's layer-0 inputs, e.g. SequenceEmbedding output in eval
    mode), timestamps [n] int64 -> the cache. Cost: one causal pass over n - 1 tokens."""
    _check_stack(blocks)
    _check_history(blocks, x, timestamps)
    empty = [(x.new_zeros(0, layer.num_heads, layer.qk_dim), x.new_zeros(0, layer.num_heads, layer.v_dim))
             for layer in blocks.layers]
    with torch.no_grad():
        _, keys, values = _run_tokens(blocks, empty, timestamps, x[:-1], timestamps[1:])
    return HistoryCache(tuple(keys), tuple(values), timestamps.clone(), x[-1].clone())


def extend_history(blocks: HSTU, cache: HistoryCache, x_new: torch.Tensor,
                   timestamps_new: torch.Tensor) -> HistoryCache:
    """Append k events (x_new [k, D] at positions n..n+k-1, timestamps_new [k]).

    Only the k newly settled tokens (the old last one, now that its next event is
    known, and all new ones but the last) are run, against the cached keys and values:
    O(k n d) per layer instead of O((n + k)^2 d)."""
    _check_stack(blocks)
    k = x_new.size(0)
    if x_new.dim() != 2 or timestamps_new.shape != (k,) or x_new.size(1) != cache.last_input.numel():
        raise ValueError(f"x_new must be [k, {cache.last_input.numel()}] and timestamps_new [k]; "
                         f"got {tuple(x_new.shape)} and {tuple(timestamps_new.shape)}")
    if k == 0:
        return cache
    if cache.length + k > blocks.num_positions:
        raise ValueError(f"history of {cache.length + k} tokens is longer than the {blocks.num_positions} positions "
                         "the model was built for: encode the most recent ones instead")
    timestamps = torch.cat([cache.timestamps, timestamps_new])
    settling = torch.cat([cache.last_input.unsqueeze(0), x_new[:-1]])
    with torch.no_grad():
        _, keys, values = _run_tokens(blocks, list(zip(cache.keys, cache.values)), timestamps, settling,
                                      timestamps_new)
    return HistoryCache(tuple(keys), tuple(values), timestamps, x_new[-1].clone())


def last_hidden(blocks: HSTU, cache: HistoryCache, request_time: int) -> torch.Tensor:
    """[D]: the stack's output at the last history position with target time =
    request_time (unnormalised): the retrieval user vector, one row against the cache."""
    _check_stack(blocks)
    with torch.no_grad():
        out, _, _ = _run_last(blocks, cache, request_time)
    return out[0]


def candidate_hidden(blocks: HSTU, cache: HistoryCache, x_candidates: torch.Tensor, request_time: int,
                     microbatch: int = DEFAULT_MICROBATCH) -> torch.Tensor:
    """x_candidates [m, D] (layer-0 inputs of the candidates at position n) -> [m, D]
    last-layer outputs. Each candidate attends to the n history tokens and to itself,
    at position n with timestamp and target time = request_time; microbatch (b_m)
    changes only memory and speed, not the results."""
    _check_stack(blocks)
    n, D = cache.length, cache.last_input.numel()
    _check_candidates(blocks, n, D, x_candidates, microbatch)
    with torch.no_grad():
        _, keys, values = _run_last(blocks, cache, request_time)
        # Every candidate has the same position (n) and target time: one bias row over the
        # history (and one self-bias) per layer, shared by all candidates.
        request, position = cache.timestamps.new_tensor(request_time), cache.timestamps.new_tensor(n)
        history_positions = torch.arange(n, device=request.device)
        N, num_buckets = blocks.num_positions, blocks.layers[0].rab.num_time_buckets
        row_index = bias_table_index(position, history_positions, request, cache.timestamps, N, num_buckets)
        self_index = bias_table_index(position, position, request, request, N, num_buckets)
        per_layer = []
        for layer, k, v in zip(blocks.layers, keys, values):
            row, self_bias = layer.rab(row_index), layer.rab(self_index)
            # [H, dqk, n] and [H, n, dv]: laid out once for the microbatches' matmuls.
            per_layer.append((k.permute(1, 2, 0).contiguous(), v.transpose(0, 1).contiguous(),
                              row.to(k.dtype), self_bias.to(k.dtype)))
        outputs = []
        for x in x_candidates.split(microbatch):
            for layer, (kt, vt, row, self_bias) in zip(blocks.layers, per_layer):
                u, q, k, v = layer.project(x)
                history = F.silu(torch.matmul(q.transpose(0, 1), kt).add_(row)) @ vt  # [H, b, dv]
                own = F.silu((q * k).sum(-1) + self_bias).unsqueeze(-1) * v  # [b, H, dv]
                x = layer.output(x, u, (history.transpose(0, 1) + own) / layer.normalizer)
            outputs.append(x)
        return torch.cat(outputs) if outputs else x_candidates.new_zeros(0, D)


def uncached_candidate_hidden(blocks: HSTU, x: torch.Tensor, timestamps: torch.Tensor, x_candidates: torch.Tensor,
                              request_time: int, microbatch: int = DEFAULT_MICROBATCH) -> torch.Tensor:
    """The paper's M-FALCON as Sec. 3.4 describes its pass, with no cache: the same [m, D] as
    `candidate_hidden` from the history's layer-0 inputs x [n, D] and timestamps [n].

    Per microbatch of b_m candidates, one pass of the whole stack over the n + b_m tokens
    [history, candidates] with the target mask (the history causal, each candidate sees the
    history and itself, at position n): the history is recomputed in every microbatch,
    O((n + b_m)^2 d) each. It is the baseline that shows what the cache adds
    (benchmarks/mfalcon.py); serving uses `candidate_hidden`."""
    _check_stack(blocks)
    _check_history(blocks, x, timestamps)
    n, D = x.shape
    _check_candidates(blocks, n, D, x_candidates, microbatch)
    request = timestamps.new_tensor([request_time])
    outputs = []
    with torch.no_grad():
        for candidates in x_candidates.split(microbatch):
            b = candidates.size(0)
            tokens = torch.cat([x, candidates])
            ts = torch.cat([timestamps, request.expand(b)])
            target_ts = torch.cat([timestamps[1:], request, request.expand(b)])
            attend = _target_masked_attention(blocks, n, b, ts, target_ts)
            for layer in blocks.layers:
                u, q, k, v = layer.project(tokens)
                tokens = layer.output(tokens, u, attend(layer, q, k, v))
            outputs.append(tokens[n:])
    return torch.cat(outputs) if outputs else x_candidates.new_zeros(0, D)


def _target_masked_attention(blocks: HSTU, n: int, b: int, timestamps: torch.Tensor, target_timestamps: torch.Tensor):
    """attend(layer, q, k, v) -> [n + b, H, dv] for one sequence of n history tokens and b
    candidates under the target mask, on a fused op (both implement the mask and the bias from
    the tables): Triton on a GPU or where the stack asks for it, the tiled CPU op elsewhere
    (also for attention_impl 'pytorch': the plain path has no target mask)."""
    device = blocks.layers[0].uvqk.weight.device
    offsets = torch.tensor([0, n + b], device=device)
    num_targets = torch.tensor([b], device=device)
    inputs = (offsets, timestamps, target_timestamps)
    if device.type == "cuda" or blocks.attention_impl == "triton":
        from .ops.hstu_attention_triton import hstu_attention_triton  # imports triton: only where it runs

        return lambda layer, q, k, v: hstu_attention_triton(
            q, k, v, *inputs, layer.rab.position_weights, layer.rab.time_weights, layer.num_positions,
            layer.normalizer, num_targets)
    plan = AttentionPlan(*inputs, blocks.num_positions, blocks.layers[0].rab.num_time_buckets, num_targets)
    return lambda layer, q, k, v: hstu_attention_cpu(
        q, k, v, *inputs, layer.rab.position_weights, layer.rab.time_weights, layer.num_positions,
        layer.normalizer, num_targets, plan=plan)


def _check_history(blocks: HSTU, x: torch.Tensor, timestamps: torch.Tensor) -> None:
    if x.dim() != 2 or timestamps.shape != x.shape[:1]:
        raise ValueError(f"x must be [n, D] and timestamps [n]; got {tuple(x.shape)} and {tuple(timestamps.shape)}")
    n = x.size(0)
    if n == 0:
        raise ValueError("history is empty: M-FALCON needs at least one event (cold start is served elsewhere)")
    if n > blocks.num_positions:
        raise ValueError(f"history of {n} tokens is longer than the {blocks.num_positions} positions the model "
                         "was built for: keep the most recent ones")


def _check_candidates(blocks: HSTU, n: int, D: int, x_candidates: torch.Tensor, microbatch: int) -> None:
    if x_candidates.dim() != 2 or x_candidates.size(1) != D:
        raise ValueError(f"x_candidates must be [m, {D}], got {tuple(x_candidates.shape)}")
    if microbatch < 1:
        raise ValueError(f"microbatch must be >= 1, got {microbatch}")
    if n >= blocks.num_positions:
        raise ValueError(f"candidates sit at position {n} (the history's length), past the {blocks.num_positions} "
                         f"positions the model was built for: keep the most recent {blocks.num_positions - 1} tokens")


def _check_stack(blocks: HSTU) -> None:
    if blocks.training:
        raise ValueError("M-FALCON is inference: call .eval() on the model first (dropout would differ per pass)")
    # The cached path implements the paper's HSTU: pointwise SiLU attention with both bias terms.
    if not blocks.is_paper_hstu:
        raise ValueError("M-FALCON supports the full HSTU only (attention 'pointwise', relative_bias 'both')")


def _run_last(blocks: HSTU, cache: HistoryCache, request_time: int):
    """The last history token at target time = request_time: its output [1, D] and
    every layer's keys and values of all n tokens (the cache's plus its own)."""
    target = cache.timestamps.new_tensor([request_time])
    return _run_tokens(blocks, list(zip(cache.keys, cache.values)), cache.timestamps,
                       cache.last_input.unsqueeze(0), target)


def _run_tokens(blocks: HSTU, cached: list, timestamps: torch.Tensor, x: torch.Tensor,
                target_timestamps: torch.Tensor):
    """Run k tokens at positions s..s+k-1 (s = cached length) through the stack,
    each attending causally to the s cached tokens and to the tokens before it.

    cached: per layer (keys [s, H, dqk], values [s, H, dv]); timestamps [s + k] of
    all tokens; x [k, D]; target_timestamps [k]. -> (out [k, D], keys, values) with
    per-layer keys and values of all s + k tokens.

    Tiles of QUERY_TILE rows go through all layers one after the other: a tile's
    queries only need keys up to its own end, which the tiles before it and itself
    have produced. So memory stays at [H, tile, s + k] whatever the length."""
    s, k = cached[0][0].size(0), x.size(0)
    N, num_buckets = blocks.num_positions, blocks.layers[0].rab.num_time_buckets
    keys = [torch.cat([ck, ck.new_empty(k, *ck.shape[1:])]) for ck, _ in cached]
    values = [torch.cat([cv, cv.new_empty(k, *cv.shape[1:])]) for _, cv in cached]
    outputs = []
    for start in range(0, k, QUERY_TILE):
        end = min(start + QUERY_TILE, k)
        xt, t, e = x[start:end], end - start, s + end  # t queries at positions s+start.., keys [0, e)
        query_pos = torch.arange(s + start, e, device=x.device).unsqueeze(1)
        key_pos = torch.arange(e, device=x.device).unsqueeze(0)
        index = bias_table_index(query_pos, key_pos, target_timestamps[start:end].unsqueeze(1),
                                 timestamps[:e].unsqueeze(0), N, num_buckets)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu_(1)  # keys after the query
        for layer, lk, lv in zip(blocks.layers, keys, values):
            u, q, kk, vv = layer.project(xt)
            lk[s + start:e], lv[s + start:e] = kk, vv
            scores = torch.matmul(q.transpose(0, 1), lk[:e].permute(1, 2, 0)).add_(layer.rab(index).to(q.dtype))
            weights = F.silu(scores)
            weights[..., e - t:].masked_fill_(future, 0)
            attended = (weights @ lv[:e].transpose(0, 1)).transpose(0, 1) / layer.normalizer
            xt = layer.output(xt, u, attended)
        outputs.append(xt)
    return torch.cat(outputs) if outputs else x, keys, values
