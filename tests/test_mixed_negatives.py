"""train.negatives (uniform, in_batch, mixed) and train.log_q_correction: the default draws and loss are
today's, mixed draws both pools, the log-Q correction lowers each negative's scaled logit by exactly log Q,
and the config names its keys when refusing. CPU only, no Ray."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from genrec.config import ConfigError, ExperimentConfig, load_config
from genrec.data.loader import BatchSpec
from genrec.model import sample_negatives, sampled_softmax_loss
from genrec.model.losses import log_expected_counts
from genrec.train.batching import draw_negatives, epoch_rng, negative_log_q
from genrec.train.loop import Worker

V, D, K = 12, 4, 6
TARGETS = torch.tensor([3, 0, 5, 3, 7, 0, 9])  # 0: a position without a target


def _config(tmp_path=None, **train) -> ExperimentConfig:
    data = {"source": {"kind": "synthetic", "path": "/unused"}}
    if tmp_path is not None:
        data["output_dir"] = str(tmp_path / "data")
    return ExperimentConfig.model_validate({"name": "neg", "data": data, "model": {"max_seq_len": 8},
                                            "train": {"num_negatives": K, **train}})


def _drawn(cfg: ExperimentConfig, seed: int = 7) -> torch.Tensor:
    return draw_negatives(epoch_rng(seed, 0), TARGETS, BatchSpec(num_items=V), cfg)


def _generator(seed: int = 7) -> torch.Generator:
    """The generator draw_negatives seeds from epoch_rng(seed, 0)'s next number."""
    return torch.Generator().manual_seed(int(epoch_rng(seed, 0).integers(2**62)))


class _Items(nn.Module):
    """An item table where the encoders keep theirs, and the whole L2-normalised table they score against."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Module()
        self.embedding.items = nn.Embedding(V + 1, D, padding_idx=0)

    def all_item_embeddings(self) -> torch.Tensor:
        return F.normalize(self.embedding.items.weight, dim=-1, eps=1e-6)


def test_default_draws_and_loss_are_todays():
    cfg = _config()
    assert (cfg.train.negatives, cfg.train.log_q_correction) == ("uniform", False)
    targets = TARGETS[TARGETS > 0]
    for kind, in_batch in (("uniform", False), ("in_batch", True)):
        drawn = _drawn(_config(negatives=kind))
        assert torch.equal(drawn, sample_negatives(targets, V, K, in_batch, _generator()))
    items = _Items().all_item_embeddings().detach()
    users = F.normalize(torch.randn(len(TARGETS), D, generator=torch.Generator().manual_seed(1)), dim=-1)
    negatives = _drawn(cfg)
    before = sampled_softmax_loss(users, TARGETS, items, negatives, temperature=0.05, normalizer=2.5)
    assert torch.equal(sampled_softmax_loss(users, TARGETS, items, negatives, temperature=0.05, normalizer=2.5,
                                            negative_log_q=None), before)


def test_mixed_draws_the_uniform_then_the_in_batch_pool():
    drawn = _drawn(_config(negatives="mixed"))
    targets = TARGETS[TARGETS > 0]
    assert drawn.shape == (len(targets), 2 * K)
    generator = _generator()
    assert torch.equal(drawn[:, :K], sample_negatives(targets, V, K, False, generator))
    assert torch.equal(drawn[:, K:], sample_negatives(targets, V, K, True, generator))
    assert set(drawn[:, K:].unique().tolist()) <= set(targets.tolist())


def test_log_q_lowers_each_negative_logit_by_log_q_and_hits_stay_masked():
    items = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    users = torch.tensor([[0.8, 0.6]])
    temperature = 0.5
    negatives = torch.tensor([[2, 3, 1]])  # 1 is the target: an accidental hit
    log_q = torch.tensor([[math.log(0.25), math.log(2.0), math.log(7.0)]])
    loss = sampled_softmax_loss(users, torch.tensor([1]), items, negatives, temperature=temperature,
                                negative_log_q=log_q)
    # by hand: target 0.8 / 0.5 = 1.6; negatives 0.6 / 0.5 - log 0.25 and 0.96 / 0.5 - log 2; the hit dropped
    logits = [1.6, 1.2 - math.log(0.25), 1.92 - math.log(2.0)]
    expected = -(logits[0] - math.log(sum(math.exp(x) for x in logits)))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_expected_counts_per_pool_by_hand():
    counts = torch.tensor([0, 3, 1, 0, 0])  # V = 4; item 0 is padding, items 3 and 4 never a target
    uniform = log_expected_counts(counts, 2, uniform=True, in_batch=False)
    assert torch.allclose(uniform, torch.full((5,), math.log(2 / 4)))
    in_batch = log_expected_counts(counts, 2, uniform=False, in_batch=True)
    assert torch.allclose(in_batch[1:], torch.tensor([2 * 3 / 4, 2 * 1 / 4, 2 * 1 / 4, 2 * 1 / 4]).log())
    mixed = log_expected_counts(counts, 2, uniform=True, in_batch=True)
    assert torch.allclose(mixed[1:], torch.tensor([0.5 + 1.5, 0.5 + 0.5, 0.5, 0.5]).log())


def test_in_batch_counts_come_from_the_training_targets(tmp_path):
    folder = tmp_path / "data" / "train"
    folder.mkdir(parents=True)
    # targets: every event but a row's first -> 2, 3, 2 (and none of the single-event row)
    pq.write_table(pa.table({"items": pa.array([[1, 2, 3], [2, 2], [4]], pa.list_(pa.int32()))}),
                   folder / "part-0.parquet")
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"complete": True, "num_items": 5}))
    cfg = _config(tmp_path, negatives="in_batch", log_q_correction=True)
    log_q = negative_log_q(cfg, "train", num_items=5)
    shares = np.array([1, 1, 2, 1, 1, 1]) / 3  # never-targets counted once, in-batch alone
    assert torch.allclose(log_q, torch.from_numpy(np.log(K * shares)).float())
    worker = Worker(cfg, 0, 1, torch.device("cpu"), None, None, None, None, BatchSpec(num_items=5),
                    BatchSpec(num_items=5), False)
    assert torch.equal(worker.item_log_q(), log_q)  # what the training loop looks negatives up in


@pytest.mark.parametrize("sharded", [False, True])
def test_worker_loss_applies_log_q_by_item_id(sharded):
    """Worker.retrieval_loss looks log Q up by the negatives' item ids before a sharded table renumbers
    them, so the whole table and the batch's table give the same corrected loss."""
    cfg = _config(negatives="mixed", log_q_correction=True)
    model = _Items().requires_grad_(False)
    worker = Worker(cfg, 0, 1, torch.device("cpu"), model, model, None, None, BatchSpec(num_items=V),
                    BatchSpec(num_items=V), sharded)
    worker._negative_log_q = torch.linspace(-3.0, 1.0, V + 1)  # as if counted from a training split
    users = F.normalize(torch.randn(len(TARGETS), D, generator=torch.Generator().manual_seed(1)), dim=-1)
    negatives = _drawn(cfg)
    loss = worker.retrieval_loss(users, TARGETS, negatives, torch.tensor([5.0]))
    expected = sampled_softmax_loss(users, TARGETS, model.all_item_embeddings(), negatives,
                                    temperature=cfg.train.temperature, normalizer=torch.tensor([5.0]),
                                    negative_log_q=worker.item_log_q()[negatives])
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    uncorrected = sampled_softmax_loss(users, TARGETS, model.all_item_embeddings(), negatives,
                                       temperature=cfg.train.temperature, normalizer=torch.tensor([5.0]))
    assert float(loss) != pytest.approx(float(uncorrected), rel=1e-3)


def _load(tmp_path, train: str, overrides=()):
    path = tmp_path / "c.yaml"
    path.write_text(f"name: t\ndata: {{source: {{kind: movielens, path: /x}}}}\ntrain: {train}\n")
    return load_config(path, list(overrides))


def test_config_keys_and_errors_name_them(tmp_path):
    assert _load(tmp_path, "{negatives: mixed, log_q_correction: true}").train.negatives == "mixed"
    # the old key, as saved configs hold it
    assert _load(tmp_path, "{in_batch_negatives: true}").train.negatives == "in_batch"
    assert _load(tmp_path, "{in_batch_negatives: false}").train.negatives == "uniform"
    assert _load(tmp_path, "{}", ["train.in_batch_negatives=true"]).train.negatives == "in_batch"
    with pytest.raises(ConfigError, match=r"train\.in_batch_negatives=True contradicts train\.negatives='mixed'"):
        _load(tmp_path, "{in_batch_negatives: true, negatives: mixed}")
    with pytest.raises(ConfigError, match=r"train\.negatives"):
        _load(tmp_path, "{negatives: popular}")
    with pytest.raises(ConfigError, match=r"train\.log_q_correction=true does not apply to train\.mode='one_pass'"):
        _load(tmp_path, "{mode: one_pass, log_q_correction: true}")
