"""Training FLOPs: the formula against a count by hand for a tiny config, and its matrix-product terms
against torch.utils.flop_counter on the real modules (forward + backward)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from genrec.config import ExperimentConfig
from genrec.model import EncoderConfig
from genrec.model.hstu import HSTU
from genrec.model.sasrec import SASRec
from genrec.train.flops import FlopModel


def experiment(**model):
    return ExperimentConfig.model_validate({
        "data": {"source": {"kind": "synthetic"}}, "model": model, "train": {"num_negatives": 2}})


def test_hstu_and_sasrec_by_hand():
    # Two users of 3 and 1 items: T = 4 tokens, S = 6 + 1 = 7 causal pairs; 3 positions have a target.
    hstu = FlopModel.from_config(experiment(kind="hstu", dim=4, num_blocks=1, num_heads=1))
    assert hstu.forward([3, 1], 3) == {
        "embeddings": 2 * 4 * 4,  # 32: x * sqrt(D) + position, per token and dimension
        "projections": 2 * 4 * 4 * 16 + 2 * 4 * 4 * 4,  # 512 + 128: f1 4 -> 2*1*(4+4) = 16, f2 4 -> 4
        "attention": 2 * 7 * 1 * (4 + 4),  # 112: q.k (4 products) and a*v (4) per causal pair
        "relative_bias": 7,  # one add per causal pair and head
        "loss": 2 * 3 * 3 * 4,  # 72: the target and 2 negatives, 4-dim dot products, at 3 positions
    }
    assert hstu.training([3, 1], 3) == 3 * (32 + 640 + 112 + 7 + 72)
    no_bias = FlopModel.from_config(experiment(kind="hstu", dim=4, num_blocks=1, relative_bias="none"))
    assert no_bias.forward([3, 1], 3)["relative_bias"] == 0
    # Two heads of 2 dims and 3 blocks: every per-layer term times 3; dqk = dv = D / H keeps f1's width.
    deep = FlopModel.from_config(experiment(kind="hstu", dim=4, num_blocks=3, num_heads=2))
    assert deep.forward([3, 1], 3)["attention"] == 3 * 2 * 7 * 2 * (2 + 2)
    assert deep.forward([3, 1], 3)["relative_bias"] == 3 * 7 * 2
    sasrec = FlopModel.from_config(experiment(kind="sasrec", dim=4, num_blocks=1, num_heads=1, ffn_dim=8))
    counts = sasrec.forward([3, 1], 3)
    assert counts["projections"] == 2 * 4 * 4 * (12 + 4 + 16)  # Q/K/V 4 -> 12, out 4 -> 4, FFN 4 -> 8 -> 4
    assert counts["attention"] == 2 * 7 * 4 * 2 and counts["relative_bias"] == 0


def counted(module, x, offsets, timestamps):
    """torch's FLOP counter over one forward and backward of `module` on a jagged batch."""
    with FlopCounterMode(display=False) as counter:
        module(x, offsets, timestamps, timestamps + 1).sum().backward()
    return {str(op).removeprefix("aten."): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("heads,dims", [(1, 8), (2, 4)])
def test_hstu_matrix_products_match_torch_flop_counter(heads, dims):
    lengths = [5, 3]
    D, blocks = 8, 2
    cfg = experiment(kind="hstu", dim=D, num_blocks=blocks, num_heads=heads, max_seq_len=8, dropout=0.0)
    encoder = HSTU(EncoderConfig(kind="hstu", num_items=10, num_positions=8, dim=D, num_blocks=blocks,
                                 num_heads=heads, dropout=0.0, attention_impl="pytorch"))
    x = torch.randn(sum(lengths), D, requires_grad=True)
    counts = counted(encoder, x, torch.tensor([0, 5, 8]), torch.arange(8))
    ours = FlopModel.from_config(cfg).forward(lengths, 0)
    # The linear layers see exactly the T jagged tokens: forward + both gradients = 3x ours.
    assert counts["mm"] + counts.get("addmm", 0) == 3 * ours["projections"]
    # The plain attention multiplies the padded [B, L, L] squares; ours counts each user's causal half:
    # the same products over 2 x 5 x 5 = 50 (query, key) slots instead of 15 + 6 = 21 pairs.
    assert counts["bmm"] == pytest.approx(3 * ours["attention"] * 50 / 21)


def test_sasrec_projections_match_torch_flop_counter():
    # On CPU, scaled_dot_product_attention is not counted by torch's counter: only the linear layers compare.
    lengths = [5, 3]
    cfg = experiment(kind="sasrec", dim=8, num_blocks=2, num_heads=2, ffn_dim=16, max_seq_len=8, dropout=0.0)
    encoder = SASRec(EncoderConfig(kind="sasrec", num_items=10, num_positions=8, dim=8, num_blocks=2, num_heads=2,
                                   ffn_dim=16, dropout=0.0))
    counts = counted(encoder, torch.randn(8, 8, requires_grad=True), torch.tensor([0, 5, 8]), torch.arange(8))
    assert counts["mm"] + counts["addmm"] == 3 * FlopModel.from_config(cfg).forward(lengths, 0)["projections"]


def test_batch_counts_real_lengths_and_targets():
    model = FlopModel.from_config(experiment(kind="hstu", dim=4, num_blocks=1))
    offsets = torch.tensor([0, 3, 4])
    targets = torch.tensor([5, 6, 0, 7])  # the last token of user 1 has no target
    assert model.batch(offsets, targets) == model.training([3, 1], 3)
    with pytest.raises(ValueError, match="model.kind 'unknown'"):
        FlopModel(kind="unknown", dim=4, num_blocks=1, num_heads=1, qk_dim=4, v_dim=4, ffn_dim=4, num_negatives=2,
                  relative_bias=False).forward([3], 1)
