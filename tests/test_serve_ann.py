"""The ANN retrieval option (retrieval.index hnsw / ivf, faiss) against exact retrieval: on the tiny
trained model (every user, through the Scorer the Retrieval deployment runs) and on a larger clustered
item table; the history is never retrieved and k items still come back after excluding it."""

import numpy as np
import pytest
import torch

from genrec.config import ConfigError, ServeRetrievalConfig
from genrec.data.prepared import read_split
from genrec.serve.index import ExactIndex, FaissIndex
from genrec.serve.model import ModelCall, Scorer, fetched, resolve_model

NOW = 1_700_000_000
K = 10
# recall@10 of the ANN top 10 against the exact top 10 must stay above these (measured: 1.0 on the tiny
# model, >= 0.99 on the clustered table; see benchmarks/retrieval_ann.py for larger catalogs)
MIN_RECALL = {"hnsw": 0.95, "ivf": 0.95}


def recall(got: list, exact: list) -> float:
    return float(np.mean([len(set(g) & set(e)) / len(e) for g, e in zip(got, exact)]))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_retrieval_on_the_trained_model_matches_exact(tiny_registered_model, kind):
    torch.set_num_threads(1)
    m = tiny_registered_model
    with fetched(resolve_model(m["uri"], m["tracking_uri"])) as folder:
        exact = Scorer(folder, cache_bytes=0, microbatch=32)
        ann = Scorer(folder, cache_bytes=0, microbatch=32, retrieval=ServeRetrievalConfig(index=kind))
    assert m["uri"].startswith("models:/") and not folder.exists(), "the registry download is removed after loading"
    assert isinstance(exact.index, ExactIndex) and isinstance(ann.index, FaissIndex)
    table = read_split(m["cfg"].data.output_dir, "sequences")
    requests = []
    for items, stamps in zip(table["items"].to_pylist(), table["timestamps"].to_pylist()):
        n = min(len(items), exact.kept_items)
        requests.append(ModelCall(user=None, version=len(items), items=np.asarray(items[-n:]),
                                  timestamps=np.asarray(stamps[-n:]), actions=None, context=(), request_time=NOW,
                                  k=K, exclude_history=True, seen=np.unique(items)))
    want, got = exact.retrieve(requests), ann.retrieve(requests)
    assert recall([g["items"] for g in got], [w["items"] for w in want]) >= MIN_RECALL[kind]
    for r, g, w in zip(requests, got, want):
        assert len(g["items"]) == len(w["items"]) == K
        assert not set(g["items"]) & set(r.seen.tolist())  # the history is excluded
        assert g["scores"] == sorted(g["scores"], reverse=True)
        # the same item gets the same score either way (faiss float32 inner product vs torch)
        shared = {i: s for i, s in zip(w["items"], w["scores"])}
        assert [s for i, s in zip(g["items"], g["scores"]) if i in shared] == pytest.approx(
            [shared[i] for i in g["items"] if i in shared], abs=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_recall_and_exclusion_on_a_larger_catalog(kind):
    """4,000 items in 40 clusters (D = 32), 100 users; each excludes its exact top 5 and 50 random items."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    n, d, clusters = 4000, 32, 40
    centers = torch.randn(clusters, d, generator=g)
    items = centers[torch.randint(0, clusters, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    items = torch.cat([torch.zeros(1, d), items])  # row 0: padding
    users = torch.nn.functional.normalize(centers[torch.randint(0, clusters, (100,), generator=g)]
                                          + torch.randn(100, d, generator=g), dim=-1)
    exact = ExactIndex(items)
    ann = FaissIndex(items, ServeRetrievalConfig(index=kind))
    assert recall([a for a, _ in ann.search(users, K, [None] * 100)],
                  [e for e, _ in exact.search(users, K, [None] * 100)]) >= MIN_RECALL[kind]
    rng = np.random.default_rng(0)
    top5 = [e[:5] for e, _ in exact.search(users, 5, [None] * 100)]
    seen = [np.unique(np.concatenate([t, rng.integers(1, n + 1, 50)])) for t in top5]
    want, got = exact.search(users, K, seen), ann.search(users, K, seen)
    assert recall([a for a, _ in got], [e for e, _ in want]) >= MIN_RECALL[kind]
    for (ids, _), s in zip(got, seen):
        assert len(ids) == K and not set(ids) & set(s.tolist()) and 0 not in ids


def test_the_index_key_is_checked():
    from pathlib import Path

    from genrec.serve.deploy import load_serve_file

    demo = Path(__file__).resolve().parents[1] / "configs" / "serve" / "demo.yaml"
    with pytest.raises(ConfigError, match="retrieval.index"):
        load_serve_file(demo, ["retrieval.index=annoy"])
    with pytest.raises(ConfigError, match="retrieval.ivf.nprobe"):
        load_serve_file(demo, ["retrieval.index=ivf", "retrieval.ivf.nprobe=0"])
