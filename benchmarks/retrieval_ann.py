"""Benchmark: ANN retrieval (faiss HNSW, IVF-Flat) against exact retrieval: recall@k and queries/s.

    python benchmarks/retrieval_ann.py [--items 100000 1000000] [--dim 64] [--queries 2000] [--k 10]
                                       [--ef-search 128 512] [--nprobe 32 128] [--hnsw-max-items 200000]
                                       [--model models:/demo-hstu/latest]
                                       [--threads 1] [--clock cpu] [--rounds 3]

What the Retrieval deployment runs (genrec.serve.index), on batches of 16 queries (its @serve.batch
size) at `--threads` threads (a replica's torch_threads): exact = one [16, items] matmul + top-k in
torch; ANN = faiss's search for k + |excluded| items, the excluded dropped after. Every query
excludes its own "history": the exact top 5 and 45 random items, so recall is measured after the
over-fetch-then-filter step, as served. recall@k = |ANN top k ∩ exact top k| / k, over all queries.

Catalogs: random item tables of `--items` rows (D = `--dim`) drawn as a Gaussian mixture (1,000
clusters, as learned embedding tables are clustered; isotropic Gaussian vectors have no structure
for an index to use and are the worst case, `--catalog gaussian`), queries near random clusters;
and, with `--model`, a trained model's own item table and its users' vectors (MovieLens-sized
catalogs are small enough for exact search: this row checks recall on real embeddings).
HNSW's build is O(n log n) and slow on few cores: it is skipped above `--hnsw-max-items`.

Rounds alternate exact and ANN on the same batches, so both see the same load; the table shows
medians over rounds. `--clock cpu` times the process's CPU seconds instead of wall seconds, the
index builds included (on a shared machine; with one thread they measure the same work).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

from genrec.config import ServeRetrievalConfig
from genrec.reports import machine
from genrec.serve.index import ExactIndex, FaissIndex

BATCH = 16
HISTORY_TOP, HISTORY_RANDOM = 5, 45


def catalog(n: int, dim: int, queries: int, kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(items [n + 1, D] with row 0 the padding, L2-normalised queries [Q, D])."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        items = torch.randn(n, dim, generator=g)
        users = torch.randn(queries, dim, generator=g)
    else:
        centers = torch.randn(1000, dim, generator=g)
        items = centers[torch.randint(0, 1000, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
        users = centers[torch.randint(0, 1000, (queries,), generator=g)] + torch.randn(queries, dim, generator=g)
    items = torch.cat([torch.zeros(1, dim), items / math.sqrt(dim)])
    return items, torch.nn.functional.normalize(users, dim=-1)


def model_catalog(uri: str, tracking_uri: str | None, queries: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A trained model's item table and the user vectors the Retrieval deployment computes for its users."""
    from genrec.data.prepared import read_split
    from genrec.serve.model import Catalog, ModelCall, Scorer, absolute_tracking_uri, fetched, resolve_model

    source = resolve_model(uri, absolute_tracking_uri(tracking_uri))
    with fetched(source) as folder:
        scorer = Scorer(folder, cache_bytes=0, microbatch=128)
        table = read_split(Catalog(folder).experiment.data.output_dir, "sequences")
    requests = []
    for items, stamps, actions in zip(table["items"].to_pylist()[:queries], table["timestamps"].to_pylist(),
                                      table["actions"].to_pylist()):
        n = min(len(items), scorer.kept_items)
        requests.append(ModelCall(user=None, version=len(items), items=np.asarray(items[-n:]),
                                  timestamps=np.asarray(stamps[-n:]), actions=np.asarray(actions[-n:]), context=(),
                                  seen=np.unique(items), request_time=int(stamps[-1]) + 1))
    users = torch.cat([scorer.user_vectors(requests[i:i + 64])[0] for i in range(0, len(requests), 64)])
    return scorer.items, users, f"{source.name} v{source.version}"


def histories(exact: ExactIndex, users: torch.Tensor, n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    top = [np.asarray(ids[:HISTORY_TOP]) for ids, _ in exact.search(users, HISTORY_TOP, [None] * len(users))]
    return [np.unique(np.concatenate([t, rng.integers(1, n + 1, HISTORY_RANDOM)])) for t in top]


def timed(index, users: torch.Tensor, k: int, seen: list, clock) -> tuple[float, list]:
    start, found = clock(), []
    for i in range(0, len(users), BATCH):
        found += index.search(users[i:i + BATCH], k, seen[i:i + BATCH])
    return len(users) / max(clock() - start, 1e-9), found


def bench(name: str, items: torch.Tensor, users: torch.Tensor, args, clock) -> list[str]:
    """One catalog: exact, then each index at each of its search settings (built once per kind)."""
    n = items.shape[0] - 1
    exact = ExactIndex(items)
    seen = histories(exact, users, n)
    built, build_s = {}, {}
    kinds = (["hnsw"] if n <= args.hnsw_max_items else []) + ["ivf"]
    for kind in kinds:
        start = clock()
        built[kind] = FaissIndex(items, ServeRetrievalConfig(index=kind))
        build_s[kind] = clock() - start
    runs = [("exact", None)] + [("hnsw", ef) for ef in args.ef_search if "hnsw" in built] + \
        [("ivf", p) for p in args.nprobe]

    def run(kind, setting):
        if kind == "hnsw":
            built[kind].index.hnsw.efSearch = setting
        elif kind == "ivf":
            built[kind].index.nprobe = setting
        return timed(exact if kind == "exact" else built[kind], users, args.k, seen, clock)

    rates = {r: [] for r in runs}
    answers = {}
    for _ in range(args.rounds):
        for r in runs:
            qps, answers[r] = run(*r)
            rates[r].append(qps)
    truth = [ids for ids, _ in answers[("exact", None)]]
    base = statistics.median(rates[("exact", None)])
    rows = []
    for kind, setting in runs:
        got = [ids for ids, _ in answers[(kind, setting)]]
        recall = np.mean([len(set(g) & set(t)) / len(t) for g, t in zip(got, truth)])
        excluded = all(not set(g) & set(s.tolist()) and len(g) == args.k for g, s in zip(got, seen))
        if kind == "hnsw":
            params = f"M={built[kind].index.hnsw.nb_neighbors(1)}, ef_search={setting}"
        elif kind == "ivf":
            params = f"nlist={built[kind].index.nlist}, nprobe={setting}"
        else:
            params = "-"
        qps = statistics.median(rates[(kind, setting)])
        build = f"{build_s[kind]:.1f}" if kind in build_s else "-"
        rows.append(f"| {name} | {n:,} | {kind} | {params} | {build} | {recall:.4f} | {'yes' if excluded else 'NO'} "
                    f"| {qps:,.0f} | {qps / base:.1f}x |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--catalog", choices=["clustered", "gaussian"], default="clustered")
    parser.add_argument("--hnsw-max-items", type=int, default=200_000)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[128, 512], help="HNSW settings to time")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[32, 128], help="IVF settings to time")
    parser.add_argument("--model", default=None, help="also a trained model's item table, e.g. models:/demo-hstu/latest")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    load = os.getloadavg()[0]
    print(f"machine: {machine()}; load average {load:.1f} at the start; torch {torch.__version__}, "
          f"{args.threads} thread(s); {args.clock} clock; batches of {BATCH} queries, k = {args.k}, each query "
          f"excluding {HISTORY_TOP} of its exact top items + {HISTORY_RANDOM} random ones; medians of "
          f"{args.rounds} rounds; baseline = exact\n", flush=True)
    print("| catalog | items | index | parameters | build s | recall@k | history excluded | queries/s | vs exact |")
    print("|---|---:|---|---|---:|---:|---|---:|---:|")
    for n in args.items:
        items, users = catalog(n, args.dim, args.queries, args.catalog)
        for line in bench(f"random {args.catalog}, D={args.dim}", items, users, args, clock):
            print(line, flush=True)
    if args.model:
        items, users, name = model_catalog(args.model, args.tracking_uri, args.queries)
        for line in bench(f"{name}, D={items.shape[1]}", items, users, args, clock):
            print(line, flush=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
