"""M-FALCON (genrec.model.mfalcon) against the plain target-aware contract.

Two plain references, both in float32:
  - the target mask: history + all m candidates as one sequence with num_targets = m
    through hstu_attention_reference (its mask: candidates see the history and themselves,
    all at position n), the layer written from Eq. (1)-(3) here;
  - m separate runs: each candidate appended alone after the history, through the real
    HSTU.forward (batched as m sequences).
Tolerance of scores and hidden states against them: assert_close with atol = rtol = 1e-5
(measured differences are ~3e-8 on values of order 1: only the summation order differs).
The paper's uncached pass (uncached_candidate_hidden) is held to the same tolerance.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from genrec.model import EncoderConfig, build_encoder
from genrec.data.layout import ACTION, CONTEXT, ITEM, TOKEN_TYPES
from genrec.model.generative import GenerativeConfig, GenerativeRecommender, TokenTypes
from genrec.model.hstu import HSTU, LAYER_NORM_EPS
from genrec.model.mfalcon import (
    QUERY_TILE,
    HistoryCache,
    candidate_hidden,
    encode_history,
    extend_history,
    last_hidden,
    uncached_candidate_hidden,
)
from genrec.model.ops.hstu_attention_reference import hstu_attention_reference
from genrec.serve.cache import UserCache

torch.set_num_threads(1)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


class TinyRanker(nn.Module):
    """A ranking model in miniature: item table, position table, an HSTU stack, task heads."""

    def __init__(self, num_items=40, num_positions=48, dim=16, heads=2, blocks=3, tasks=3):
        super().__init__()
        config = EncoderConfig(num_positions=num_positions, dim=dim, num_heads=heads, num_blocks=blocks, dropout=0.0)
        self.items = nn.Embedding(num_items + 1, dim)
        self.positions = nn.Embedding(num_positions, dim)
        self.blocks = HSTU(config)
        self.heads = nn.Linear(dim, tasks)

    def embed(self, item_ids, start):
        return self.items(item_ids) + self.positions(torch.arange(start, start + item_ids.numel()))

    def candidate_embeddings(self, item_ids, position):
        return self.items(item_ids) + self.positions.weight[position]


def user(n, num_items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, num_items + 1, (n,), generator=g)
    timestamps = torch.randint(0, 10**8, (n,), generator=g).sort().values
    return ids, timestamps, int(timestamps[-1]) + 5_000


def reference_target_mask(blocks, x, timestamps, candidates, request_time):
    """Last-layer outputs of the m candidates, all appended as targets of one sequence."""
    n, m = x.size(0), candidates.size(0)
    request = timestamps.new_full((m,), request_time)
    tokens = torch.cat([x, candidates])
    ts = torch.cat([timestamps, request])
    target_ts = torch.cat([timestamps[1:], request[:1], request])
    offsets, num_targets = torch.tensor([0, n + m]), torch.tensor([m])
    for layer in blocks.layers:
        H, dqk, dv = layer.num_heads, layer.qk_dim, layer.v_dim
        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=LAYER_NORM_EPS)
        u, v, q, k = F.silu(layer.uvqk(normed)).split([H * dv, H * dv, H * dqk, H * dqk], dim=-1)
        attended = hstu_attention_reference(
            q.view(-1, H, dqk), k.view(-1, H, dqk), v.view(-1, H, dv), offsets, ts, target_ts,
            layer.rab.position_weights, layer.rab.time_weights, layer.num_positions, layer.normalizer, num_targets,
        ).reshape(n + m, H * dv)
        tokens = tokens + layer.out(u * F.layer_norm(attended, attended.shape[-1:], eps=LAYER_NORM_EPS))
    return tokens[n:]


def reference_separate_runs(blocks, x, timestamps, candidates, request_time):
    """Last-layer outputs of the m candidates, each its own sequence after the history (HSTU.forward)."""
    n, m = x.size(0), candidates.size(0)
    request = timestamps.new_tensor([request_time])
    tokens = torch.cat([x.expand(m, n, -1), candidates.unsqueeze(1)], dim=1).reshape(m * (n + 1), -1)
    ts = torch.cat([timestamps, request]).repeat(m)
    target_ts = torch.cat([timestamps[1:], request, request]).repeat(m)
    offsets = torch.arange(m + 1) * (n + 1)
    return blocks(tokens, offsets, ts, target_ts)[offsets[1:] - 1]


@pytest.fixture(scope="module")
def ranker():
    torch.manual_seed(0)
    model = TinyRanker().eval()
    for layer in model.blocks.layers:  # larger bias tables than the init's: the bias must matter
        nn.init.normal_(layer.rab.position_weights, std=0.5)
        nn.init.normal_(layer.rab.time_weights, std=0.5)
    return model


@pytest.mark.parametrize("reference", [reference_target_mask, reference_separate_runs])
@pytest.mark.parametrize("n", [1, 2, 23])
def test_scores_equal_the_plain_contract(ranker, reference, n):
    ids, timestamps, request_time = user(n, seed=n)
    candidate_ids = torch.randint(1, 41, (9,), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x, candidates = ranker.embed(ids, 0), ranker.candidate_embeddings(candidate_ids, n)
        expected = ranker.heads(reference(ranker.blocks, x, timestamps, candidates, request_time))
        cache = encode_history(ranker.blocks, x, timestamps)
        scores = ranker.heads(candidate_hidden(ranker.blocks, cache, candidates, request_time, microbatch=4))
    torch.testing.assert_close(scores, expected, **TOLERANCE)
    # The request time matters (it is in every candidate's bias): a test that could not tell would be empty.
    with torch.no_grad():
        later = ranker.heads(candidate_hidden(ranker.blocks, cache, candidates, request_time + 10**7))
    assert (later - scores).abs().max() > 1e-3


@pytest.mark.parametrize("n, m, microbatch", [(1, 5, 2), (23, 9, 4), (30, 13, 5), (40, 7, 7), (47, 3, 128)])
def test_the_papers_uncached_pass_equals_the_cached_path_and_separate_runs(ranker, n, m, microbatch):
    """One target-masked pass over [history, b_m candidates] per microbatch (history recomputed each time)
    scores as the cache does and as each candidate alone after the history; m need not be a multiple of b_m,
    and (30, 13, 5) puts a microbatch across a tile boundary of the tiled CPU op (32 rows)."""
    ids, timestamps, request_time = user(n, seed=10 + n)
    candidate_ids = torch.randint(1, 41, (m,), generator=torch.Generator().manual_seed(n))
    with torch.no_grad():
        x, candidates = ranker.embed(ids, 0), ranker.candidate_embeddings(candidate_ids, n)
        uncached = ranker.heads(uncached_candidate_hidden(ranker.blocks, x, timestamps, candidates, request_time,
                                                          microbatch))
        cache = encode_history(ranker.blocks, x, timestamps)
        cached = ranker.heads(candidate_hidden(ranker.blocks, cache, candidates, request_time, microbatch))
        alone = ranker.heads(reference_separate_runs(ranker.blocks, x, timestamps, candidates, request_time))
    assert uncached.shape == (m, 3)
    torch.testing.assert_close(uncached, cached, **TOLERANCE)
    torch.testing.assert_close(uncached, alone, **TOLERANCE)
    if m > 1:  # candidates do not see each other: distinct candidates keep distinct scores
        assert uncached.std(0).min() > 1e-3


TRITON_UNCACHED_PASS = """
import torch
from genrec.model import EncoderConfig
from genrec.model.hstu import HSTU
from genrec.model.mfalcon import candidate_hidden, encode_history, uncached_candidate_hidden
torch.manual_seed(0)
blocks = HSTU(EncoderConfig(num_positions=40, dim=16, num_heads=2, num_blocks=2, dropout=0.0,
                            attention_impl="triton")).eval()
g = torch.Generator().manual_seed(1)
x, candidates = torch.randn(21, 16, generator=g), torch.randn(7, 16, generator=g)
timestamps = torch.randint(0, 10**8, (21,), generator=g).sort().values
uncached = uncached_candidate_hidden(blocks, x, timestamps, candidates, 10**8, microbatch=3)
cached = candidate_hidden(blocks, encode_history(blocks, x, timestamps), candidates, 10**8, microbatch=3)
torch.testing.assert_close(uncached, cached, atol=1e-5, rtol=1e-5)
"""


def test_the_papers_uncached_pass_on_the_triton_kernel_in_the_interpreter():
    """The GPU branch (the Triton kernel with num_targets), run in Triton's interpreter on the CPU: a subprocess,
    as TRITON_INTERPRET must be set before triton is imported."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", TRITON_UNCACHED_PASS], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_history_longer_than_a_tile_equals_the_plain_contract():
    torch.manual_seed(1)
    n = QUERY_TILE + 37  # encoding runs in tiles of QUERY_TILE rows: cross the boundary
    blocks = HSTU(EncoderConfig(num_positions=n + 1, dim=8, num_heads=1, num_blocks=2, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(2)
    x, candidates = torch.randn(n, 8, generator=g), torch.randn(5, 8, generator=g)
    timestamps = torch.randint(0, 10**8, (n,), generator=g).sort().values
    with torch.no_grad():
        expected = reference_separate_runs(blocks, x, timestamps, candidates, 10**8)
        got = candidate_hidden(blocks, encode_history(blocks, x, timestamps), candidates, 10**8)
    torch.testing.assert_close(got, expected, **TOLERANCE)


def test_permuting_candidates_permutes_scores_and_microbatch_changes_nothing(ranker):
    ids, timestamps, request_time = user(30, seed=3)
    candidate_ids = torch.arange(1, 41)
    permutation = torch.randperm(40, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = encode_history(ranker.blocks, ranker.embed(ids, 0), timestamps)
        candidates = ranker.candidate_embeddings(candidate_ids, 30)
        scores = {b: ranker.heads(candidate_hidden(ranker.blocks, cache, candidates, request_time, microbatch=b))
                  for b in (1, 7, 40, 128)}
        permuted = ranker.heads(candidate_hidden(ranker.blocks, cache, candidates[permutation], request_time, 7))
    assert scores[7].std(0).min() > 1e-3  # distinct candidates get distinct scores
    torch.testing.assert_close(permuted, scores[7][permutation], atol=1e-6, rtol=1e-6)
    for b in (1, 40, 128):
        torch.testing.assert_close(scores[b], scores[7], atol=1e-6, rtol=1e-6)


def test_appending_events_extends_the_cache_and_agrees_with_encoding_from_scratch(ranker):
    ids, timestamps, request_time = user(35, seed=5)
    with torch.no_grad():
        x = ranker.embed(ids, 0)
        fresh = encode_history(ranker.blocks, x, timestamps)
        cache = encode_history(ranker.blocks, x[:12], timestamps[:12])
        for start, end in ((12, 13), (13, 29), (29, 35)):  # one event, then several at a time
            cache = extend_history(ranker.blocks, cache, x[start:end], timestamps[start:end])
        candidates = ranker.candidate_embeddings(torch.arange(1, 11), 35)
        extended_scores = candidate_hidden(ranker.blocks, cache, candidates, request_time)
        fresh_scores = candidate_hidden(ranker.blocks, fresh, candidates, request_time)
        expected = reference_separate_runs(ranker.blocks, x, timestamps, candidates, request_time)
    assert cache.length == 35 and cache.keys[0].size(0) == 34  # the last token is not settled yet
    for extended, scratch in zip(cache.keys + cache.values, fresh.keys + fresh.values):
        torch.testing.assert_close(extended, scratch, **TOLERANCE)
    torch.testing.assert_close(extended_scores, fresh_scores, **TOLERANCE)
    torch.testing.assert_close(extended_scores, expected, **TOLERANCE)


def test_generative_ranking_through_mfalcon_equals_its_rank_contract():
    """Serving's composition (issue 10's model): task_logits(candidate_hidden(...)) = model.rank, before
    and after appending an (item, action) pair to the cached history."""
    torch.manual_seed(3)
    encoder = EncoderConfig(num_items=30, num_positions=32, dim=16, num_blocks=2, num_heads=2, dropout=0.0)
    model = GenerativeRecommender(GenerativeConfig(encoder, num_actions=3, multi_hot_actions=True, num_context=5,
                                                   tasks=(("click", "binary"), ("rating", "regression")),
                                                   token_types=TokenTypes(*TOKEN_TYPES))).eval()
    g = torch.Generator().manual_seed(8)
    pairs = 9  # context token, then (item, action) pairs
    items, actions = torch.randint(1, 31, (pairs,), generator=g), torch.randint(1, 8, (pairs,), generator=g)
    ids = torch.cat([torch.tensor([2]), torch.stack([items, actions], 1).flatten()])
    types = torch.tensor([CONTEXT] + [ITEM, ACTION] * pairs)
    stamps = (1_600_000_000 + torch.randint(1, 5000, (pairs,), generator=g).cumsum(0)).repeat_interleave(2)
    timestamps = torch.cat([stamps[:1], stamps])
    request_time, candidates = int(timestamps[-1]) + 600, torch.tensor([4, 29, int(items[0]), 11, 1])
    full = {"item_ids": ids, "token_types": types, "timestamps": timestamps}
    with torch.no_grad():
        x, ts = model.history_inputs(full)
        n = x.size(0) - 2  # the last pair arrives later, as appended events
        cache = encode_history(model.blocks, x[:n], ts[:n])
        for history, c in (({k: v[:n] for k, v in full.items()}, cache),
                           (full, extend_history(model.blocks, cache, x[n:], ts[n:]))):
            length = history["item_ids"].numel()
            hidden = candidate_hidden(model.blocks, c, model.candidate_embeddings(candidates, length), request_time, 2)
            torch.testing.assert_close(model.predictions(model.task_logits(hidden)),
                                       model.rank(history, candidates, request_time), **TOLERANCE)


def test_retrieval_user_vector_is_the_encoders_last_position():
    torch.manual_seed(2)
    encoder = build_encoder(EncoderConfig(kind="hstu", num_items=60, num_positions=40, dim=16, dropout=0.0)).eval()
    ids, timestamps, request_time = user(31, num_items=60, seed=6)
    target_ts = torch.cat([timestamps[1:], timestamps.new_tensor([request_time])])
    with torch.no_grad():
        expected = encoder(ids, timestamps, target_ts, torch.tensor([0, 31]))[-1]
        x = encoder.embedding(ids, torch.tensor([0, 31]))
        cache = encode_history(encoder.blocks, x, timestamps)
        extended = extend_history(encoder.blocks, encode_history(encoder.blocks, x[:20], timestamps[:20]),
                                  x[20:], timestamps[20:])
        vectors = [F.normalize(last_hidden(encoder.blocks, c, request_time), dim=-1) for c in (cache, extended)]
        # Retrieval against the item table with the cached vector ranks items as the encoder does.
        table = encoder.all_item_embeddings()
    for vector in vectors:
        torch.testing.assert_close(vector, expected, **TOLERANCE)
        assert torch.equal((table @ vector).topk(10).indices, (table @ expected).topk(10).indices)


def test_bad_input_is_refused_with_a_clear_message(ranker):
    ids, timestamps, request_time = user(10)
    x = ranker.embed(ids, 0).detach()
    with pytest.raises(ValueError, match="empty"):
        encode_history(ranker.blocks, x[:0], timestamps[:0])
    with pytest.raises(ValueError, match="the 48 positions"):
        encode_history(ranker.blocks, torch.zeros(49, 16), torch.arange(49))
    cache = encode_history(ranker.blocks, x, timestamps)
    with pytest.raises(ValueError, match="the 48 positions"):
        extend_history(ranker.blocks, cache, torch.zeros(39, 16), torch.arange(39))
    with pytest.raises(ValueError, match=r"x_candidates must be \[m, 16\]"):
        candidate_hidden(ranker.blocks, cache, torch.zeros(3, 15), request_time)
    with pytest.raises(ValueError, match="microbatch"):
        candidate_hidden(ranker.blocks, cache, torch.zeros(3, 16), request_time, microbatch=0)
    full = encode_history(ranker.blocks, torch.zeros(48, 16), torch.arange(48))
    with pytest.raises(ValueError, match="position 48"):  # no position left for the candidates
        candidate_hidden(ranker.blocks, full, torch.zeros(3, 16), 100)
    assert candidate_hidden(ranker.blocks, cache, torch.zeros(0, 16), request_time).shape == (0, 16)
    with pytest.raises(ValueError, match="microbatch"):
        uncached_candidate_hidden(ranker.blocks, x, timestamps, torch.zeros(3, 16), request_time, microbatch=0)
    with pytest.raises(ValueError, match="position 48"):
        uncached_candidate_hidden(ranker.blocks, torch.zeros(48, 16), torch.arange(48), torch.zeros(3, 16), 100)
    assert uncached_candidate_hidden(ranker.blocks, x, timestamps, torch.zeros(0, 16), request_time).shape == (0, 16)
    ranker.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            encode_history(ranker.blocks, x, timestamps)
        with pytest.raises(ValueError, match="eval"):
            uncached_candidate_hidden(ranker.blocks, x, timestamps, torch.zeros(3, 16), request_time)
    finally:
        ranker.eval()


def fake_history(length: int, dim: int = 4) -> HistoryCache:
    """A cache of a given size (the UserCache only looks at its bytes)."""
    return HistoryCache((torch.zeros(length - 1, 1, dim),), (torch.zeros(length - 1, 1, dim),),
                        torch.zeros(length, dtype=torch.long), torch.zeros(dim))


def test_user_cache_is_a_bounded_lru_keyed_by_user_and_version():
    entry = fake_history(10)  # 9*4*4 * 2 + 10*8 + 4*4 = 384 bytes
    assert entry.nbytes == 384
    users = UserCache(max_bytes=3 * 384)
    for name in ("a", "b", "c"):
        assert users.put(name, 1, entry)
    assert users.get("a", 1) is entry  # "a" is now the most recently used
    assert users.get("a", 2) is None  # another version is a miss
    assert users.put("d", 1, entry)  # evicts "b", the least recently used
    assert users.get("b", 1) is None and users.get("c", 1) is entry and users.get("d", 1) is entry
    assert (len(users), users.nbytes, users.evictions, users.hits, users.misses) == (3, 3 * 384, 1, 3, 2)
    # A new version replaces the user's old one; an older one never replaces a newer one.
    assert users.put("a", 2, entry) and users.get("a", 1) is None and users.get("a", 2) is entry
    assert not users.put("a", 1, entry) and users.latest("a") == (2, entry)
    assert len(users) == 3 and users.nbytes == 3 * 384
    # An entry larger than the whole budget is not stored (and evicts nothing).
    assert not users.put("e", 1, fake_history(100)) and len(users) == 3
    assert users.latest("e") is None
    with pytest.raises(ValueError, match="max_bytes"):
        UserCache(max_bytes=-1)
