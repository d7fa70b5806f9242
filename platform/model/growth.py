"""Growing a trained model to a larger item vocabulary: a grown vocabulary (genrec.data.vocabulary) keeps
every old dense id and appends the new ones after them, so the item table keeps every trained row as it is
and gains rows at the end.

    replaced = grow_item_tables(model, num_items)    # a live model (tell its optimizer: optim.grow_optimizer_rows)
    state = grow_state_dict(state, num_items)        # or a saved / gathered state dict

Only the item table grows: the action, context, token-type, position and age tables of the rankers are
sized by the action and context vocabularies and the sequence length, which a new item or user leaves as
they are. No model kind has a user table (a user is their history). A row-wise sharded table
(genrec.train.sharding) is refused: grow the model before sharding it, or grow the whole state dict
(full_state_dict) and load it into a model built with the new size.

New rows start as a freshly built table's rows do, unless given (genrec.model.embeddings.init_table's draw,
from a generator seeded by the table's old and new sizes, so the same growth gives the same rows): a grown
model is the model it would have been, built with the larger table. Measured against the alternatives on
a synthetic world where items enter (benchmarks/refresh_rounds.py, HSTU and SASRec, one seed): rows at the
trained rows' mean (the first version of this module) are a trap for ranking, since retrieval scores
L2-normalised rows and users' vectors lean toward the catalog's centre: a frozen model ranking the next
window with new rows at the mean scored NDCG@10 .0000, with random rows .0332, with zero rows .0458.
Rows opposite the centre (the mean negated) ranked like zero rows at first, but users' vectors followed
the new items during the pass, and one round later the same rule put the next round's new items at the
top for SASRec (.0163 against .0574 with zero rows). No starting direction is safe for a row nobody has
trained, so the one model that ranks with such rows, the frozen current model in a refresh's gate, gives
them zero rows instead (genrec.train.refresh.unknown_rows_zeroed): an item it never knew scores 0.
"""

import dataclasses

import torch
import torch.nn as nn

from .embeddings import init_table

# Where each model kind keeps its item table: SequentialEncoder (hstu, sasrec) embedding.items;
# GenerativeRecommender (gr) and DLRMRanker (dlrm) items (genrec.train.sharding splits these too).
ITEM_TABLES = ("embedding.items", "items")
STATE_KEYS = tuple(f"{name}.weight" for name in ITEM_TABLES)


def starting_rows(weight: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[num_rows - R, D] fp32 rows for the items a [R, D] table gains, as a new table starts them."""
    generator = torch.Generator().manual_seed(weight.size(0) * 1_000_003 + num_rows)
    return init_table(torch.empty(num_rows - weight.size(0), weight.size(1)), generator)


def grow_rows(weight: torch.Tensor, num_rows: int, new_rows: torch.Tensor | None = None) -> torch.Tensor:
    """[R, D] -> [num_rows, D]: the R rows unchanged, then num_rows - R new ones, `new_rows` ([D], one row for
    all, or [num_rows - R, D]) or else starting_rows (see the module's docstring)."""
    added = num_rows - weight.size(0)
    if added < 0:
        raise ValueError(f"a table of {weight.size(0)} rows cannot grow to {num_rows}: growth keeps every row")
    if added == 0:
        return weight.detach()
    rows = starting_rows(weight, num_rows) if new_rows is None else new_rows
    return torch.cat([weight.detach(), rows.to(weight.dtype).to(weight.device).expand(added, weight.size(1))])


def item_table(model: nn.Module) -> tuple[str, nn.Module]:
    """(dotted name, module) of the model's item table."""
    modules = dict(model.named_modules())
    for name in ITEM_TABLES:
        if name in modules:
            return name, modules[name]
    raise ValueError(f"{type(model).__name__} has no item table (looked for {', '.join(ITEM_TABLES)})")


@torch.no_grad()
def grow_item_tables(model: nn.Module, num_items: int,
                     new_rows: torch.Tensor | None = None) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Grow the model's item table to items 1..num_items (row 0 stays padding) in place, and record the
    new size in its config (what build_model and a saved model's manifest say). Returns the replaced
    parameters as (old, new) pairs, for the optimizer (genrec.train.optim.grow_optimizer_rows); none when
    the table already has that size."""
    name, table = item_table(model)
    if not isinstance(table, nn.Embedding):
        raise TypeError(f"{name} is a {type(table).__name__}, not an nn.Embedding: a row-wise sharded table "
                        "does not grow in place; grow the model before sharding it, or gather its whole "
                        "state dict (genrec.train.sharding.full_state_dict), grow that (grow_state_dict) and "
                        "load it into a model built with the new item count")
    if table.num_embeddings == num_items + 1:
        return []
    old = table.weight
    table.weight = nn.Parameter(grow_rows(old, num_items + 1, new_rows), requires_grad=old.requires_grad)
    table.num_embeddings = num_items + 1
    model.config = _with_num_items(model.config, num_items)
    return [(old, table.weight)]


def _with_num_items(config, num_items: int):
    """An EncoderConfig, or a ranker's GenerativeConfig (its encoder's), sized for num_items."""
    if hasattr(config, "encoder"):
        return dataclasses.replace(config, encoder=dataclasses.replace(config.encoder, num_items=num_items))
    return dataclasses.replace(config, num_items=num_items)


def state_item_key(state: dict) -> str:
    """The key of the item table in a model's whole state dict."""
    for key in STATE_KEYS:
        if key in state:
            return key
    raise ValueError(f"the state dict has no item table (looked for {', '.join(STATE_KEYS)})")


def grow_state_dict(state: dict, num_items: int, new_rows: torch.Tensor | None = None) -> dict:
    """A model's whole state dict with its item table grown to items 1..num_items, as grow_item_tables
    grows a live model's: it loads into a model built for num_items."""
    key = state_item_key(state)
    return {**state, key: grow_rows(state[key], num_items + 1, new_rows)}
