"""Tests of genrec.model: jagged helpers, HSTU attention and relative bias,
HSTU and SASRec encoders, and the sampled-softmax loss. Small and CPU-only."""

import math

import pytest
import torch
import torch.nn.functional as F

from genrec.model.jagged import concat_ranges
from genrec.model.hstu import PaddedAttention, TiledCPUAttention
from genrec.model import (
    EncoderConfig,
    HSTULayer,
    RelativeBucketedTimeAndPositionBias,
    build_encoder,
    gathered_dot,
    hstu_attention,
    jagged_to_padded,
    padded_to_jagged,
    padding_mask,
    positions_in_sequence,
    relative_bias_index,
    sample_negatives,
    sampled_softmax_loss,
)

torch.set_num_threads(1)



def offsets_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def random_batch(lengths, num_items, seed=0):
    """A jagged batch as the data layer builds it: target_timestamps[i] = ts[i+1],
    and the request time (a bit after the last event) at a user's last position."""
    g = torch.Generator().manual_seed(seed)
    ids, ts, target_ts = [], [], []
    for n in lengths:
        times = torch.randint(0, 10**8, (n,), generator=g).sort().values
        request_time = times[-1] + int(torch.randint(0, 10**6, (1,), generator=g))
        ids.append(torch.randint(1, num_items + 1, (n,), generator=g))
        ts.append(times)
        target_ts.append(torch.cat([times[1:], request_time.view(1)]))
    return torch.cat(ids), torch.cat(ts), torch.cat(target_ts), offsets_of(lengths)


def user_slice(batch, b):
    ids, ts, target_ts, offsets = batch
    s, e = int(offsets[b]), int(offsets[b + 1])
    return ids[s:e], ts[s:e], target_ts[s:e], torch.tensor([0, e - s])


def time_bucket(gap):
    """The paper code's bucketing, written from the formula."""
    return min(max(math.floor(math.log(max(abs(gap), 1)) / 0.301), 0), 128)


# ----------------------------------------------------------------------------- jagged


def test_jagged_helpers_match_a_per_user_loop():
    lengths = [3, 1, 4]
    offsets = offsets_of(lengths)
    values = torch.randn(8, 2)
    padded = jagged_to_padded(values, offsets, 5, padding_value=-1.0)
    assert padded.shape == (3, 5, 2)
    for b, n in enumerate(lengths):
        s = int(offsets[b])
        assert torch.equal(padded[b, :n], values[s : s + n])
        assert (padded[b, n:] == -1.0).all()
    assert torch.equal(padding_mask(offsets, 5), torch.arange(5).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1))
    assert torch.equal(padded_to_jagged(padded, offsets), values)
    assert positions_in_sequence(offsets, 8).tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert concat_ranges(torch.tensor([5, 0, 2]), torch.tensor([2, 0, 3])).tolist() == [5, 6, 2, 3, 4]
    assert concat_ranges(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)).tolist() == []


# ----------------------------------------------------------------------------- attention


def naive_hstu_attention(q, k, v, rab, offsets, max_seq_len):
    """out_i = sum_{j <= i} SiLU(q_i . k_j + rab_ij) v_j / N, user by user, pair by pair."""
    out = torch.zeros(q.size(0), q.size(1), v.size(2), dtype=q.dtype)
    for b in range(offsets.numel() - 1):
        s, n = int(offsets[b]), int(offsets[b + 1] - offsets[b])
        for h in range(q.size(1)):
            for i in range(n):
                for j in range(i + 1):
                    weight = F.silu((q[s + i, h] * k[s + j, h]).sum() + rab[b, i, j]) / max_seq_len
                    out[s + i, h] += weight * v[s + j, h]
    return out


def test_hstu_attention_is_silu_of_biased_scores_over_n_without_softmax():
    torch.manual_seed(0)
    lengths, H, N = [3, 1, 5], 2, 8
    offsets, T, L = offsets_of(lengths), sum(lengths), max(lengths)
    q, k = torch.randn(T, H, 4), torch.randn(T, H, 4)
    v, rab = torch.randn(T, H, 3), torch.randn(len(lengths), L, L)
    expected = naive_hstu_attention(q, k, v, rab, offsets, N)
    torch.testing.assert_close(hstu_attention(q, k, v, rab, offsets, N), expected)
    # The normaliser is the fixed N, not the batch's or the user's length.
    assert not torch.allclose(hstu_attention(q, k, v, rab, offsets, L), expected)


def test_hstu_attention_gradcheck():
    torch.manual_seed(0)
    lengths, H = [2, 3], 2
    offsets, T, L = offsets_of(lengths), sum(lengths), max(lengths)
    inputs = [torch.randn(T, H, 3), torch.randn(T, H, 3), torch.randn(T, H, 2), torch.randn(2, L, L)]
    inputs = [t.double().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(lambda q, k, v, rab: hstu_attention(q, k, v, rab, offsets, 7), inputs)


# ----------------------------------------------------------------------------- relative bias


def test_relative_bias_matches_formula_double_loop():
    torch.manual_seed(0)
    N, lengths = 6, [4, 6, 1]
    offsets, T, L = offsets_of(lengths), sum(lengths), max(lengths)
    ts = torch.randint(0, 10**9, (T,))
    target_ts = ts + torch.randint(-(10**7), 10**7, (T,))
    ts[0], target_ts[1] = 10**17, 0  # a gap past the last bucket (clamped to 128)
    target_ts[2] = ts[1]  # a zero gap (bucket 0)
    bias = RelativeBucketedTimeAndPositionBias(N)
    rab = bias(relative_bias_index(ts, target_ts, offsets, L, N))
    assert rab.shape == (3, L, L)
    buckets_seen = set()
    for b, n in enumerate(lengths):
        s = int(offsets[b])
        for i in range(n):
            for j in range(n):
                bucket = time_bucket(int(target_ts[s + i]) - int(ts[s + j]))
                buckets_seen.add(bucket)
                expected = bias.position_weights[N - 1 + j - i] + bias.time_weights[bucket]
                assert rab[b, i, j] == expected, (b, i, j)
    assert {0, 128} <= buckets_seen


def test_relative_bias_gradient_reaches_both_tables():
    bias = RelativeBucketedTimeAndPositionBias(4).double()
    index = relative_bias_index(torch.tensor([0, 5, 50]), torch.tensor([5, 50, 500]), offsets_of([3]), 3, 4)
    weight = torch.randn(1, 3, 3, dtype=torch.float64)
    (bias(index) * weight).sum().backward()
    expected_pos, expected_time = torch.zeros(7, dtype=torch.float64), torch.zeros(129, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            expected_pos[3 + j - i] += weight[0, i, j]
            expected_time[int(index[0, i, j]) // 7] += weight[0, i, j]
    torch.testing.assert_close(bias.position_weights.grad, expected_pos)
    torch.testing.assert_close(bias.time_weights.grad, expected_time)


# ----------------------------------------------------------------------------- HSTU layer


def test_hstu_layer_gradcheck_inputs_and_weights():
    torch.manual_seed(0)
    N, lengths = 5, [3, 2]
    offsets, T = offsets_of(lengths), sum(lengths)
    layer = HSTULayer(EncoderConfig(dim=4, num_heads=2, qk_dim=3, v_dim=2, num_positions=N, dropout=0.0)).double()
    ts = torch.tensor([0, 100, 5000, 7, 70000])
    batch = PaddedAttention(offsets, ts, ts + 3000, N)
    names = [name for name, _ in layer.named_parameters()]

    def run(x, *weights):
        return torch.func.functional_call(layer, dict(zip(names, weights)), (x, batch))

    x = torch.randn(T, 4, dtype=torch.float64, requires_grad=True)
    weights = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(run, (x, *weights))


# ----------------------------------------------------------------------------- encoders


def naive_hstu_encoder(model, ids, ts, target_ts):
    """One user, padded to the fixed N as the paper's code does, every formula
    spelled out; returns the L2-normalised outputs of the n real positions."""
    emb, N = model.embedding, model.blocks.num_positions
    n, D = ids.numel(), emb.dim
    x = torch.zeros(N, D)
    x[:n] = emb.items.weight[ids] * math.sqrt(D) + emb.positions.weight[:n]
    for layer in model.blocks.layers:
        H, dqk, dv = layer.num_heads, layer.qk_dim, layer.v_dim
        uvqk = F.silu(F.layer_norm(x, (D,), eps=1e-6) @ layer.uvqk.weight.T)
        u, v, q, k = uvqk.split([H * dv, H * dv, H * dqk, H * dqk], dim=1)
        av = torch.zeros(N, H * dv)
        for h in range(H):
            for i in range(n):
                for j in range(i + 1):
                    rab = layer.rab.position_weights[N - 1 + j - i] + layer.rab.time_weights[
                        time_bucket(int(target_ts[i]) - int(ts[j]))
                    ]
                    score = q[i, h * dqk : (h + 1) * dqk] @ k[j, h * dqk : (h + 1) * dqk] + rab
                    av[i, h * dv : (h + 1) * dv] += F.silu(score) / N * v[j, h * dv : (h + 1) * dv]
        x = x + layer.out(u * F.layer_norm(av, (H * dv,), eps=1e-6))
    return F.normalize(x[:n], dim=-1)


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_padding_invariance(kind):
    torch.manual_seed(0)
    lengths = [5, 1, 3, 6]
    model = build_encoder(EncoderConfig(kind, num_items=30, num_positions=8, dim=8, num_heads=2)).eval()
    batch = random_batch(lengths, 30)
    with torch.no_grad():
        together = model(*batch)
        for b in range(len(lengths)):
            s, e = int(batch[3][b]), int(batch[3][b + 1])
            alone = model(*user_slice(batch, b))
            torch.testing.assert_close(together[s:e], alone, atol=1e-5, rtol=1e-5)
            if kind == "hstu":
                naive = naive_hstu_encoder(model, *user_slice(batch, b)[:3])
                torch.testing.assert_close(together[s:e], naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_causality(kind):
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(kind, num_items=30, num_positions=8, dim=8, num_heads=2)).eval()
    ids, ts, target_ts, offsets = random_batch([4, 6, 3], 30)
    start, cut = 4, 3  # user 1, its positions >= 3 change
    changed_ids, changed_ts, changed_target_ts = ids.clone(), ts.clone(), target_ts.clone()
    later = slice(start + cut, start + 6)
    changed_ids[later] = (ids[later] % 30) + 1
    changed_ts[later] += 12345
    changed_target_ts[later] += 999_999  # target times of positions >= cut only
    with torch.no_grad():
        before = model(ids, ts, target_ts, offsets)
        after = model(changed_ids, changed_ts, changed_target_ts, offsets)
    torch.testing.assert_close(after[: start + cut], before[: start + cut], atol=0, rtol=0)
    torch.testing.assert_close(after[start + 6 :], before[start + 6 :], atol=0, rtol=0)
    assert not torch.allclose(after[later], before[later])


def test_hstu_position_sees_its_target_time():
    """Position i is biased by |target_ts[i] - ts[j]|: the request time matters."""
    model = build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8)).eval()
    ids, ts, target_ts, offsets = random_batch([4], 30)
    later_request = target_ts.clone()
    later_request[-1] += 10**8
    with torch.no_grad():
        assert not torch.allclose(model(ids, ts, target_ts, offsets)[-1], model(ids, ts, later_request, offsets)[-1])


def test_sasrec_block_matches_reference_multihead_attention():
    """The reference block: Q = LN(x); MHA(Q, x, x) with a causal mask; h = LN(Q + mha); h + FFN(h)."""
    torch.manual_seed(0)
    D, H, lengths = 8, 2, [4, 2]
    model = build_encoder(EncoderConfig("sasrec", num_items=30, num_positions=8, dim=D, num_heads=H)).eval()
    block = model.blocks.layers[0]
    mha = torch.nn.MultiheadAttention(D, H, batch_first=True).eval()
    mha.in_proj_weight.data.copy_(block.in_proj.weight)
    mha.in_proj_bias.data.copy_(block.in_proj.bias)
    mha.out_proj.load_state_dict(block.out_proj.state_dict())
    offsets = offsets_of(lengths)
    x = torch.randn(sum(lengths), D)
    padded = jagged_to_padded(x, offsets, 4)
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        q = F.layer_norm(padded, (D,), eps=1e-8)
        h = F.layer_norm(q + mha(q, padded, padded, attn_mask=causal)[0], (D,), eps=1e-8)
        expected = padded_to_jagged(h + block.ffn(h), offsets)
        torch.testing.assert_close(block(x, offsets), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["hstu", "sasrec"])
def test_same_seed_same_outputs_and_loss(kind):
    batch = random_batch([5, 3], 40)
    targets = torch.randint(0, 41, (8,), generator=torch.Generator().manual_seed(1))
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_encoder(EncoderConfig(kind, num_items=40, num_positions=8, dim=8))  # train mode: dropout active
        torch.manual_seed(1)
        out = model(*batch)
        loss = sampled_softmax_loss(
            out, targets, model.all_item_embeddings(), num_negatives=16, generator=torch.Generator().manual_seed(2)
        )
        results.append((out, loss))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_encoder_output_and_item_vectors_are_unit_length():
    model = build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8))
    out = model(*random_batch([3, 2], 30))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    table = model.all_item_embeddings()
    assert table.shape == (31, 8)
    torch.testing.assert_close(table[1:].norm(dim=-1), torch.ones(30))
    torch.testing.assert_close(model.item_embeddings(torch.tensor([4, 7])), table[[4, 7]])


def hstu_layer_params(D, H, dqk, dv, N):
    return D * 2 * H * (dqk + dv) + (H * dv * D + D) + (2 * N - 1) + 129


@pytest.mark.parametrize(
    "kind, blocks, heads, per_block",
    [
        ("hstu", 2, 1, hstu_layer_params(50, 1, 50, 50, 200)),  # MovieLens-1M HSTU
        ("hstu", 8, 2, hstu_layer_params(50, 2, 25, 25, 200)),  # HSTU-large
        ("sasrec", 2, 1, (3 * 50 * 50 + 3 * 50) + (50 * 50 + 50) + 2 * (50 * 50 + 50)),  # SASRec, FFN 50
    ],
)
def test_movielens_recipes_build_and_train(kind, blocks, heads, per_block):
    V, N, D = 3883, 200, 50
    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(kind, num_items=V, num_positions=N, dim=D, num_blocks=blocks, num_heads=heads))
    assert sum(p.numel() for p in model.parameters()) == (V + 1) * D + N * D + blocks * per_block
    if kind == "hstu":
        assert model.blocks.layers[0].uvqk.weight.shape == (2 * heads * 2 * (D // heads), D)
    batch = random_batch([7, 2, 5], V)
    targets = torch.cat([batch[0][1:], torch.tensor([0])])  # next item; none at the very end
    out = model(*batch)
    assert out.shape == (14, D)
    loss = sampled_softmax_loss(out, targets, model.all_item_embeddings(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ----------------------------------------------------------------------------- loss


def test_gathered_dot_matches_gather_and_gradcheck():
    torch.manual_seed(0)
    queries, table = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    ids = torch.randint(0, 7, (5, 4))
    torch.testing.assert_close(gathered_dot(queries, table, ids), (table[ids] * queries.unsqueeze(1)).sum(-1))
    assert torch.autograd.gradcheck(gathered_dot, (queries.requires_grad_(), table.requires_grad_(), ids))


def test_loss_is_temperature_scaled_softmax_with_accidental_hits_masked():
    users = F.normalize(torch.randn(2, 4), dim=-1)
    items = F.normalize(torch.randn(6, 4), dim=-1)
    targets = torch.tensor([1, 2])
    negatives = torch.tensor([[1, 3, 4], [5, 2, 2]])  # 1 and the two 2s are accidental hits
    loss = sampled_softmax_loss(users, targets, items, negatives, temperature=0.05)
    cos = users @ items.T
    expected = [
        -torch.log_softmax(torch.stack([cos[0, 1], cos[0, 3], cos[0, 4]]) / 0.05, 0)[0],
        -torch.log_softmax(torch.stack([cos[1, 2], cos[1, 5]]) / 0.05, 0)[0],
    ]
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_loss_is_zero_when_every_negative_is_an_accidental_hit():
    users = F.normalize(torch.randn(3, 4), dim=-1)
    items = F.normalize(torch.randn(2, 4), dim=-1)  # a single item: every negative is the target
    loss = sampled_softmax_loss(users, torch.tensor([1, 0, 1]), items, num_negatives=8)
    assert loss.item() == 0.0


def test_loss_skips_positions_without_target():
    g = torch.Generator().manual_seed(0)
    users, items = F.normalize(torch.randn(4, 4), dim=-1), F.normalize(torch.randn(9, 4), dim=-1)
    targets = torch.tensor([3, 0, 5, 0])
    loss = sampled_softmax_loss(users, targets, items, num_negatives=5, generator=torch.Generator().manual_seed(0))
    negatives = sample_negatives(targets[[0, 2]], 8, 5, generator=g)
    expected = sampled_softmax_loss(users[[0, 2]], targets[[0, 2]], items, negatives)
    assert torch.equal(loss, expected)


def test_negative_sampling_uniform_and_in_batch():
    targets = torch.tensor([4, 4, 9, 2])
    uniform = sample_negatives(targets, 10, 500, generator=torch.Generator().manual_seed(0))
    assert uniform.shape == (4, 500) and uniform.min() == 1 and uniform.max() == 10
    again = sample_negatives(targets, 10, 500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform, again)
    in_batch = sample_negatives(targets, 10, 500, in_batch=True, generator=torch.Generator().manual_seed(0))
    assert set(in_batch.unique().tolist()) == {2, 4, 9}


def test_in_batch_loss_trains_and_masks_hits():
    users = F.normalize(torch.randn(3, 4), dim=-1).requires_grad_()
    items = F.normalize(torch.randn(10, 4), dim=-1)
    same = sampled_softmax_loss(users, torch.tensor([6, 6, 6]), items, in_batch_negatives=True)
    assert same.item() == 0.0  # the batch's only target is everyone's positive
    loss = sampled_softmax_loss(
        users, torch.tensor([6, 2, 7]), items, num_negatives=16, in_batch_negatives=True,
        generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    assert loss.item() > 0 and users.grad.abs().sum() > 0



def test_attention_normalizer_option_sets_hstu_one_over_n():
    torch.manual_seed(0)
    default = build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8, dropout=0.0)).eval()
    paper = build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8, dropout=0.0,
                                        attention_normalizer=11)).eval()
    paper.load_state_dict(default.state_dict())  # same weights, tables still sized by num_positions
    assert [layer.normalizer for layer in paper.blocks.layers] == [11, 11]
    assert [layer.normalizer for layer in default.blocks.layers] == [8, 8]
    batch = random_batch([3, 2], 30)
    assert not torch.allclose(default(*batch), paper(*batch))
    # it is exactly the 1/N of Eq. (2): the layer's attention with N = 11
    layer, x = paper.blocks.layers[0], torch.randn(5, 8)
    offsets = batch[3]
    index = relative_bias_index(batch[1], batch[2], offsets, 3, 8)
    u, v, q, k = F.silu(layer.uvqk(F.layer_norm(x, (8,), eps=1e-6))).split([8, 8, 8, 8], dim=-1)
    attended = hstu_attention(q.view(5, 1, 8), k.view(5, 1, 8), v.view(5, 1, 8), layer.rab(index), offsets, 11)
    expected = x + layer.out(u * F.layer_norm(attended.reshape(5, 8), (8,), eps=1e-6))
    torch.testing.assert_close(layer(x, PaddedAttention(offsets, batch[1], batch[2], 8)), expected)


def test_fused_attention_dispatch_matches_the_plain_path():
    torch.manual_seed(0)
    plain = build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8, num_heads=2, dropout=0.0,
                                        attention_impl="pytorch"))
    tiled = build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8, num_heads=2, dropout=0.0,
                                        attention_impl="cpu"))
    tiled.load_state_dict(plain.state_dict())
    batch = random_batch([5, 1, 8], 30)
    out_plain, out_tiled = plain(*batch), tiled(*batch)
    torch.testing.assert_close(out_tiled, out_plain, atol=1e-5, rtol=1e-4)
    out_plain.sum().backward()
    out_tiled.sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), tiled.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="attention_impl"):
        build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8, attention_impl="fast"))(*batch)
    # auto: the tiled path while the weights are on the CPU (Triton once on a GPU, tested where there is one)
    auto = build_encoder(EncoderConfig("hstu", num_items=30, num_positions=8, dim=8))
    assert isinstance(auto.blocks.batch_attention(*batch[3:], *batch[1:3]), TiledCPUAttention)
