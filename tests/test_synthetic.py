"""The synthetic world: determinism, the oracle really is the best, actions follow affinity,
new items enter at the configured rate, counts add up through the pipeline."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from genrec.config import DataConfig, SyntheticSource
from genrec.data import synthetic as S
from genrec.metrics import metrics_from_ranks
from genrec.train.evaluation import full_ranks

WORLD = dict(kind="synthetic", num_users=500, num_items=400, mean_events_per_user=20, min_events_per_user=3,
             num_topics=16, block_users=64, seed=3)
STREAM = dict(WORLD, new_item_fraction=0.5, item_half_life_days=20, duration_days=100, period_days=5)


def _generate(tmp_path, name, **spec):
    return S.generate(SyntheticSource(**spec, path=str(tmp_path / name)))


@pytest.fixture(scope="module")
def stream_world(ray_cluster, tmp_path_factory):
    """A non-stationary world generated once: (source, folder)."""
    source = SyntheticSource(**STREAM, num_shards=3, path=str(tmp_path_factory.mktemp("syn") / "stream"))
    return source, S.generate(source)


def _users(events):
    """Per user (ascending id): the impressions' items in time order (second actions dropped)."""
    t = events.to_pandas().drop_duplicates(["user_id", "item_id", "timestamp"])
    return {u: g["item_id"].to_numpy() for u, g in t.groupby("user_id", sort=True)}


def test_same_rows_whatever_the_number_of_shards(ray_cluster, tmp_path):
    one = _generate(tmp_path, "one", **WORLD, num_shards=1)
    four = _generate(tmp_path, "four", **WORLD, num_shards=4)
    again = _generate(tmp_path, "again", **WORLD, num_shards=4)
    assert len(list((four / "events").iterdir())) == 4
    assert pq.read_table(one / "events").equals(pq.read_table(four / "events"))
    assert pq.read_table(one / "truth").equals(pq.read_table(four / "truth"))
    assert json.loads((one / "oracle.json").read_text()) == json.loads((four / "oracle.json").read_text())
    for f in sorted((four / "events").iterdir()):  # same config twice: same bytes
        assert f.read_bytes() == (again / "events" / f.name).read_bytes()
    other = _generate(tmp_path, "other", **{**WORLD, "seed": 4}, num_shards=1)
    assert not pq.read_table(one / "events").equals(pq.read_table(other / "events"))


def test_ranking_by_the_true_parameters_scores_exactly_the_oracle(stream_world):
    source, folder = stream_world
    world = S.build_world(source)
    oracle = json.loads((folder / "oracle.json").read_text())
    truth = pq.read_table(folder / "truth").to_pandas()
    sequences = _users(pq.read_table(folder / "events"))
    counts = np.zeros(world.num_items + 1)
    for items in sequences.values():
        np.add.at(counts, items[:-2] if len(items) >= 3 else items, 1)
    assert oracle["oracle_users"] == len(sequences) == source.num_users  # every user (stride 1)
    for split in S.SPLIT_NAMES:
        rows = truth[truth["split"] == split].reset_index(drop=True)
        cut = 2 if split == "valid" else 1
        histories = [sequences[u][:-cut] for u in rows["user_id"]]
        assert all(sequences[u][-cut] == i for u, i in zip(rows["user_id"], rows["item_id"]))
        history = torch.tensor(np.concatenate(histories))
        history_rows = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor([len(h) for h in histories]))
        targets = torch.tensor(rows["item_id"].to_numpy())
        pz = np.stack(rows["topic_probs"].to_numpy())
        # the "model" given the true parameters: one-hot topic item vectors scaled by F[p, i], query = pz
        ranks = torch.zeros(len(rows), dtype=torch.long)
        for p in np.unique(rows["period"]):
            at = np.flatnonzero(rows["period"].to_numpy() == p)
            items = torch.zeros(world.num_items + 1, world.num_topics, dtype=torch.float64)
            items[torch.arange(1, world.num_items + 1), torch.tensor(world.item_topic[1:])] = torch.tensor(
                world.item_factors(int(p))[1:])
            keep = torch.isin(history_rows, torch.tensor(at))
            remap = torch.full((len(rows),), -1, dtype=torch.long)
            remap[torch.tensor(at)] = torch.arange(len(at))
            ranks[torch.tensor(at)] = full_ranks(torch.tensor(pz[at]), targets[at], items, history[keep],
                                                 remap[history_rows[keep]])
        assert ranks.tolist() == rows["oracle_rank"].tolist()
        best = metrics_from_ranks(ranks)
        assert best == pytest.approx(oracle[split]["oracle"], rel=1e-12, abs=0)
        popular = metrics_from_ranks(full_ranks(torch.ones(len(rows), 1, dtype=torch.float64), targets,
                                                torch.tensor(counts)[:, None], history, history_rows))
        assert popular == pytest.approx(oracle[split]["popularity"], rel=1e-12, abs=0)
        for key in ("hr@10", "hr@50", "ndcg@10", "mrr"):
            assert popular[key] < best[key]

        # optimal in expectation, target by target: the top-k true mass of the oracle ranking
        # is at least that of popularity or of a noisy version of the truth
        probs = world.next_item_probs(pz, rows["period"].to_numpy())
        for r, h in enumerate(histories):
            probs[r, h] = 0.0
        probs /= probs.sum(1, keepdims=True)
        noisy = probs * np.random.default_rng(0).lognormal(0, 1, size=probs.shape)
        for k in (10, 50):
            def mass(scores):
                top = np.argsort(-np.where(probs > 0, scores, -1), axis=1, kind="stable")[:, :k]
                return np.take_along_axis(probs, top, 1).sum(1)
            assert (mass(probs) >= mass(np.broadcast_to(counts, probs.shape)) - 1e-12).all()
            assert (mass(probs) >= mass(noisy) - 1e-12).all()
            assert mass(probs).mean() > mass(noisy).mean()


def test_actions_respond_to_affinity(stream_world):
    source, folder = stream_world
    world = S.build_world(source)
    affinity = np.linspace(-0.5, 1.0, 7)
    _, _, bits = world.action_probs(affinity, np.zeros(7), source.multi_action_rate)
    names = world.action_names
    assert (np.diff(bits[:, names.index("purchase")]) > 0).all()  # strong actions rise with affinity
    assert (np.diff(bits[:, names.index("click")]) < 0).all()  # the weakest action falls
    # a planted population: labels drawn from the true probabilities; those probabilities separate them
    rng = np.random.default_rng(0)
    a = rng.uniform(-0.3, 1.0, 50_000)
    position = rng.integers(0, 10, 50_000)
    q, m, bits = world.action_probs(a, position, source.multi_action_rate)
    assert np.allclose(bits.sum(1), 1 + m)  # one action per impression plus the second one's chance
    for k, name in enumerate(names):
        labels = rng.random(len(a)) < bits[:, k]
        assert S.auc(labels, bits[:, k]) > 0.6, name
        assert S.normalized_entropy(labels, bits[:, k]) < 0.99, name
    # the generated events: realistic rates, and the oracle beats the base rate on rare strong actions
    oracle = json.loads((folder / "oracle.json").read_text())
    rates = oracle["action_rates_all_events"]
    assert rates["click"] > 0.6 and rates["purchase"] < 0.08
    assert oracle["test"]["actions"]["purchase"]["oracle_auc"] > 0.55


def test_new_items_enter_at_the_configured_rate(stream_world):
    source, folder = stream_world
    world = pq.read_table(folder / "world.parquet").to_pandas()
    new = world[world["birth_day"] > 0]
    assert len(new) == round(source.new_item_fraction * source.num_items)
    summary = json.loads((folder / "oracle.json").read_text())["world"]
    assert summary["new_items_per_day"] == pytest.approx(len(new) / source.duration_days, abs=1e-3)
    # uniform over the span: each quarter gets about a quarter of the new items
    quarters = np.bincount((new["birth_day"] / source.duration_days * 4).astype(int), minlength=4)
    assert (np.abs(quarters - len(new) / 4) < 0.3 * len(new) / 4).all()
    # no item is consumed before its birth period; new items do get consumed
    events = pq.read_table(folder / "events").to_pandas()
    b = S.build_world(source)
    periods = b.period_of(events["timestamp"].to_numpy())
    assert (periods >= b.item_birth[events["item_id"].to_numpy()]).all()
    consumed_new = np.isin(events["item_id"].to_numpy(), new["item_id"].to_numpy()).mean()
    assert consumed_new > 0.1


def test_counts_add_up_through_the_pipeline(stream_world, tmp_path):
    from genrec.data.pipeline import prepare

    try:
        from genrec.data.prepared import read_manifest, read_split
    except ImportError:  # before the prepared-data module existed
        from genrec.data.loader import read_split
        from genrec.data.pipeline import read_manifest

    source, folder = stream_world
    cfg = DataConfig.model_validate({"source": source.model_dump(), "output_dir": str(tmp_path / "out"),
                                     "num_partitions": 2})
    summary = prepare(cfg, log=lambda *_: None)
    oracle = json.loads((folder / "oracle.json").read_text())
    assert summary["input_rows"] == summary["accepted"] + summary["rejected"] == oracle["rows"]
    assert summary["rejected"] == 0 and summary["duplicates_dropped"] == 0
    assert summary["sequence_events"] == oracle["impressions"]
    assert summary["merged_into_bitmask"] == oracle["rows"] - oracle["impressions"]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["synthetic_oracle"]["test"]["oracle"] == oracle["test"]["oracle"]
    # the prepared leave-one-out targets are the generator's (dense ids = raw ids here)
    truth = pq.read_table(folder / "truth").to_pandas()
    test = {r["user"]: r["items"][-1] for r in read_split(tmp_path / "out", "test").to_pylist()}
    expected = truth[truth["split"] == "test"]
    assert [test[u] for u in expected["user_id"]] == expected["item_id"].tolist()
    masks = {r["user"]: r["actions"][-1] for r in read_split(tmp_path / "out", "test").to_pylist()}
    assert [masks[u] for u in expected["user_id"]] == expected["action_mask"].tolist()
