"""Top-k items by inner product with the user vector, some items excluded per query.

    ExactIndex   every item's score (a [B, items] matmul): the default, always right
    FaissIndex   an approximate index (faiss HNSW or IVF-Flat, inner product) for catalogs
                 where the matmul is too slow; recall@k against exact: benchmarks/retrieval_ann.py

Row 0 of the item table is padding and never retrieved. Exclusion (the user's history)
is applied after the search: an ANN index cannot filter inside its graph or lists, so
it is asked for k + |excluded| items, which leaves at least k once they are dropped
(fewer only when the index itself finds fewer, e.g. an IVF search whose probed lists
hold fewer items).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import ServeRetrievalConfig


class ExactIndex:
    def __init__(self, items: torch.Tensor) -> None:
        self.items = items

    def search(self, users: torch.Tensor, k: int, exclude: list[np.ndarray | None]) -> list[tuple[list, list]]:
        scores = users @ self.items.T
        scores[:, 0] = -torch.inf
        out = []
        for row, seen in zip(scores, exclude):
            if seen is not None:
                row[torch.as_tensor(seen, device=row.device)] = -torch.inf
            top = torch.topk(row, min(k, int(torch.isfinite(row).sum())))
            out.append((top.indices.tolist(), top.values.tolist()))
        return out


class FaissIndex:
    def __init__(self, items: torch.Tensor, cfg: ServeRetrievalConfig) -> None:
        import faiss  # only when configured: exact serving needs no faiss

        faiss.omp_set_num_threads(torch.get_num_threads())  # the replica's share (torch_threads), not every core
        vectors = np.ascontiguousarray(items[1:].detach().cpu().numpy(), dtype=np.float32)  # without the padding row
        n, dim = vectors.shape
        if cfg.index == "hnsw":
            index = faiss.IndexHNSWFlat(dim, cfg.hnsw.m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.hnsw.ef_construction
            index.hnsw.efSearch = cfg.hnsw.ef_search
        elif cfg.index == "ivf":
            # faiss's k-means wants >= 39 training points per cluster
            nlist = min(cfg.ivf.nlist or min(int(4 * math.sqrt(n)), n // 39), n) or 1
            self.quantizer = faiss.IndexFlatIP(dim)  # the index uses it and does not own it: keep it alive
            index = faiss.IndexIVFFlat(self.quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.max_points_per_centroid = 64  # k-means on a sample (faiss's default 256): 4x faster builds
            index.train(vectors)
            index.nprobe = min(cfg.ivf.nprobe, nlist)
        else:
            raise ValueError(f"retrieval.index: {cfg.index!r} is not an ANN index (hnsw, ivf)")
        index.add(vectors)  # faiss ids 0.. = dense item ids 1..
        self.index = index

    def search(self, users: torch.Tensor, k: int, exclude: list[np.ndarray | None]) -> list[tuple[list, list]]:
        extra = max((len(s) for s in exclude if s is not None), default=0)
        wanted = min(k + extra, self.index.ntotal)
        scores, ids = self.index.search(np.ascontiguousarray(users.cpu().numpy(), dtype=np.float32), wanted)
        out = []
        for row_ids, row_scores, seen in zip(ids, scores, exclude):
            keep = row_ids >= 0  # -1: the index found fewer
            if seen is not None:
                keep &= ~np.isin(row_ids + 1, seen)
            out.append(((row_ids[keep][:k] + 1).tolist(), row_scores[keep][:k].tolist()))
        return out


def build_index(items: torch.Tensor, cfg: ServeRetrievalConfig) -> ExactIndex | FaissIndex:
    return ExactIndex(items) if cfg.index == "exact" else FaissIndex(items, cfg)
