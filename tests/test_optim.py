"""train.embedding_optimizer: RowSparseAdamW (genrec.train.optim) against torch.optim.AdamW, its reference.
Sharded tables under it: tests/test_sharding.py."""

import copy

import torch

from genrec.train.optim import RowSparseAdamW, build_optimizer, record_touched_rows

HYPER = dict(lr=0.05, betas=(0.9, 0.98), weight_decay=0.1)


def _pair(rows=12, dim=4):
    torch.manual_seed(0)
    table, dense = torch.nn.Parameter(torch.randn(rows, dim)), torch.nn.Parameter(torch.randn(3))
    return table, dense


def test_where_every_row_is_touched_it_is_adamw_exactly():
    table, dense = _pair()
    table_ref, dense_ref = copy.deepcopy(table), copy.deepcopy(dense)
    ours = RowSparseAdamW([{"params": [dense]}, {"params": [table]}], [table], **HYPER)
    reference = torch.optim.AdamW([{"params": [dense_ref]}, {"params": [table_ref]}], **HYPER)
    for _ in range(5):
        g, gd = torch.randn(table.shape), torch.randn(3)
        table.grad, table_ref.grad, dense.grad, dense_ref.grad = g.clone(), g.clone(), gd.clone(), gd.clone()
        ours.step()
        reference.step()
    assert torch.equal(table, table_ref) and torch.equal(dense, dense_ref)
    assert torch.equal(ours.state[table]["exp_avg_sq"], reference.state[table_ref]["exp_avg_sq"])


def test_untouched_rows_stay_and_touched_rows_follow_adamw_on_themselves():
    """Rows 2, 5 and 7 get gradients on every step: they end where AdamW on a table of just those rows
    ends (same step count, so the same bias correction); every other row, and its moments, is unchanged
    bit for bit, although AdamW's momentum and weight decay would have moved it."""
    table, _ = _pair()
    start = table.detach().clone()
    touched = torch.tensor([2, 5, 7])
    sub = torch.nn.Parameter(start[touched].clone())
    ours = RowSparseAdamW([table], [table], **HYPER)
    reference = torch.optim.AdamW([sub], **HYPER)
    dense_table = copy.deepcopy(table)
    dense = torch.optim.AdamW([dense_table], **HYPER)
    for _ in range(4):
        g = torch.randn(len(touched), table.size(1))
        table.grad = torch.zeros_like(table).index_copy(0, touched, g)
        dense_table.grad = table.grad.clone()
        sub.grad = g.clone()
        ours.step()
        reference.step()
        dense.step()
    untouched = torch.ones(len(table), dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(table[touched], sub)
    assert torch.equal(table[untouched], start[untouched])
    assert not ours.state[table]["exp_avg"][untouched].any()
    assert not torch.equal(dense_table[untouched], start[untouched])  # what the dense update does instead
    assert int(ours.state[table]["step"]) == 4


def test_state_is_adamw_state_both_ways():
    """A checkpoint written under one optimizer resumes under the other (train.embedding_optimizer may
    change on resume)."""
    table, _ = _pair()
    ours = RowSparseAdamW([table], [table], **HYPER)
    table.grad = torch.randn(table.shape)
    ours.step()
    theirs = torch.optim.AdamW([table], **HYPER)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.state[table]["exp_avg"], ours.state[table]["exp_avg"])
    back = RowSparseAdamW([table], [table], **HYPER)
    back.load_state_dict(theirs.state_dict())
    table.grad = torch.randn(table.shape)
    back.step()
    assert int(back.state[table]["step"]) == 2


def test_zero_grad_clears_only_the_updated_rows_and_keeps_the_table_buffer():
    """A table's gradient buffer survives zero_grad, zero again (sharded lookups add into it in place:
    genrec.train.sharding._OwnedRows); other parameters' gradients are dropped as AdamW drops them."""
    table, dense = _pair()
    ours = RowSparseAdamW([{"params": [dense]}, {"params": [table]}], [table], **HYPER)
    table.grad = torch.zeros_like(table)
    table.grad[[1, 4]] = torch.randn(2, table.size(1))
    dense.grad = torch.randn(3)
    buffer = table.grad
    ours.step()
    ours.zero_grad()
    assert table.grad is buffer and not buffer.any() and dense.grad is None


def test_recorded_rows_replace_the_scan_and_are_forgotten_by_either_optimizer():
    """Rows recorded by a lookup (genrec.train.sharding) are read instead of scanning the table; a recorded
    row whose gradient is zero is not updated (the rule stays: nonzero gradient). AdamW, which updates every
    row, drops the record after its step, so it does not grow."""
    table, _ = _pair()
    start = table.detach().clone()
    ours = RowSparseAdamW([table], [table], **HYPER)
    table.grad = torch.zeros_like(table)
    table.grad[[2, 3]] = 1.0
    record_touched_rows(table, torch.tensor([3, 2, 3, 6]))  # 6: looked up, no gradient
    ours.step()
    changed = (table != start).any(dim=1).nonzero().squeeze(1).tolist()
    assert changed == [2, 3] and not hasattr(table, "_genrec_touched_rows")
    dense = build_optimizer([{"params": [table]}], [table], "adamw", **HYPER)
    record_touched_rows(table, torch.tensor([1]))
    dense.step()
    assert not hasattr(table, "_genrec_touched_rows")
