"""Full-ranking evaluation: each target is ranked against the whole item universe.

No sampled candidates: rank = 1 + the number of items scoring higher than the
target, after removing padding (id 0) and the items already in the user's history
(the target itself is never removed). HR@k, NDCG@k and MRR of the ranks come from
genrec.metrics, the same code that scores the synthetic world's oracle.

One computation scores everything: the target's score is read from the same
GEMM block that scores the rest of the catalog. (Scoring the target apart, e.g.
as an elementwise product-sum, rounds differently in float32, and the target's
own GEMM column can then come out above it: the target "beats itself" and every
metric is under-reported.) Scores are computed a block of items at a time (ITEM_BLOCK) so
memory stays flat however large the catalog; with more than one block the
blocks are computed twice, by the same call, so both passes see the same bits.

Exact ties (another item with exactly the target's score) follow `ties`:
"pessimistic" (the default) ranks the target below every item it ties with, so a
collapsed model that scores all items alike gets the worst rank, not the best;
"optimistic" counts only strictly higher scores. A non-finite target score
ranks last.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ..metrics import metrics_from_ranks
from ..model.jagged import concat_ranges, positions_in_sequence

TiePolicy = Literal["pessimistic", "optimistic"]
# Items scored per GEMM: a block of scores for a batch of queries (128 x 4096 floats, 2 MiB) stays in
# cache while it is compared with the targets' scores; 65,536-item blocks ran the comparison from
# memory at about a third of the speed (measured on this project's 2-CPU machine).
ITEM_BLOCK = 4_096


def full_ranks(queries: torch.Tensor, targets: torch.Tensor, items: torch.Tensor,
               history: torch.Tensor, history_rows: torch.Tensor, item_block: int = ITEM_BLOCK,
               ties: TiePolicy = "pessimistic", first_id: int = 0, total_rows: int | None = None,
               sum_over_workers: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Rank of each target among all items.

    queries [M, D] user vectors; targets [M] item ids; items [V+1, D] (row = id);
    history / history_rows: flat item ids and the query row each belongs to
    (excluded from ranking unless equal to that row's target).

    One block of a table split over workers (genrec.train.sharding.local_catalog): items are the rows
    of ids first_id.. of a table of total_rows, every worker ranks the same queries against its own
    rows, and sum_over_workers (an all-reduce) adds up the target scores (each read by the worker
    that owns the target, 0 elsewhere: the sum is exact) and the counts of items that outrank them.
    """
    if ties not in ("pessimistic", "optimistic"):
        raise ValueError(f"ties must be 'pessimistic' or 'optimistic', got {ties!r}")
    total_rows = items.size(0) if total_rows is None else total_rows
    excluded = history != targets[history_rows]
    rows, cols = history_rows[excluded], history[excluded] - first_id
    local_targets = targets - first_id

    def block_scores(start: int) -> torch.Tensor:
        scores = queries @ items[start : start + item_block].T
        if first_id + start == 0:
            scores[:, 0] = -math.inf  # padding
        in_block = (cols >= start) & (cols < start + scores.size(1))
        scores[rows[in_block], cols[in_block] - start] = -math.inf
        return scores

    starts = range(0, items.size(0), item_block)
    only_block = block_scores(0) if len(starts) == 1 else None
    target_scores = queries.new_zeros(len(targets))
    for start in starts:
        scores = only_block if only_block is not None else block_scores(start)
        here = torch.nonzero((local_targets >= start) & (local_targets < start + scores.size(1))).squeeze(1)
        target_scores[here] = scores[here, local_targets[here] - start]
    if sum_over_workers:
        target_scores = sum_over_workers(target_scores)
    # one comparison pass: pessimistic rank = #(score >= target's), the target itself included;
    # optimistic rank = 1 + #(score > target's)
    outranks = torch.ge if ties == "pessimistic" else torch.gt
    ranks = torch.zeros(len(targets), dtype=torch.long, device=queries.device)
    for start in starts:
        scores = only_block if only_block is not None else block_scores(start)
        ranks += outranks(scores, target_scores.unsqueeze(1)).sum(1, dtype=torch.int32)  # int32: half the bytes
    if sum_over_workers:
        ranks = sum_over_workers(ranks)
    ranks += ties == "optimistic"
    return torch.where(torch.isfinite(target_scores), ranks, total_rows - 1)


def whole_catalog(model) -> dict:
    """What evaluate ranks against by default: the model's whole L2-normalised item table."""
    return {"items": model.all_item_embeddings()}


@torch.no_grad()
def evaluate(model, batches, item_block: int = ITEM_BLOCK, ties: TiePolicy = "pessimistic",
             catalog: Callable[..., dict] = whole_catalog) -> dict[str, float]:
    """Metrics over every target position of `batches` (jagged torch batches, see genrec.data.loader).
    catalog(model): what to rank against, as full_ranks' keyword arguments (a worker's block of a sharded
    table: genrec.train.sharding.local_catalog; every worker then evaluates the same batches)."""
    was_training = model.training
    model.eval()
    items = catalog(model)
    ranks = []
    for batch in batches:
        users = model(batch["item_ids"], batch["timestamps"], batch["target_timestamps"], batch["offsets"])
        position = torch.nonzero(batch["target_ids"] > 0).squeeze(1)
        if len(position) == 0:
            continue
        # history of a target at flat position p: its user's input tokens up to p
        seen = positions_in_sequence(batch["offsets"], len(batch["item_ids"]))[position] + 1
        history = batch["item_ids"][concat_ranges(position + 1 - seen, seen)]
        history_rows = torch.arange(len(position), device=position.device).repeat_interleave(seen)
        ranks.append(full_ranks(users[position], batch["target_ids"][position], history=history,
                                history_rows=history_rows, item_block=item_block, ties=ties, **items))
    model.train(was_training)
    if not ranks:
        raise ValueError("no evaluation targets in the split")
    result = metrics_from_ranks(torch.cat(ranks).cpu())
    result["count"] = float(sum(len(r) for r in ranks))
    return result
