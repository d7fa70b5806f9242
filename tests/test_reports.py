"""The grid driver of the seed-grid recipes (jobs/reproduce.py, jobs/rank_compare.py): runs in order, every
finished run kept in the .json beside the table, the table rewritten after each run, and a re-run (after a
stop, or with more seeds) runs only the cells that have no row."""

import json

import pytest

from genrec.reports import groups, markdown_table, mean_std, run_grid


def grid(models, seeds, ran, stop_at=None):
    """(key, run) cells; run() records its cell and returns a made-up NDCG, or stops the grid at `stop_at`."""
    def run(model, seed):
        if (model, seed) == stop_at:
            raise KeyboardInterrupt
        ran.append((model, seed))
        return {"test/ndcg@10": 0.1 * seed}
    return (({"model": m, "seed": s}, lambda m=m, s=s: run(m, s)) for s in seeds for m in models)


def table(rows):
    lines = [[model, str(len(runs)), mean_std(runs, "test/ndcg@10")] for model, runs in groups(rows, "model").items()]
    return markdown_table("caption", ["model", "seeds", "NDCG@10"], lines)


def test_a_stopped_grid_keeps_its_finished_runs_and_a_rerun_does_only_the_rest(tmp_path):
    out = tmp_path / "results" / "grid.md"
    ran = []
    with pytest.raises(KeyboardInterrupt):
        run_grid(out, grid(["sasrec", "hstu"], [1, 2], ran, stop_at=("hstu", 2)), table)
    assert ran == [("sasrec", 1), ("hstu", 1), ("sasrec", 2)]  # seed by seed, every model's seed 1 first
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved == [{"model": "sasrec", "seed": 1, "test/ndcg@10": 0.1}, {"model": "hstu", "seed": 1, "test/ndcg@10": 0.1},
                     {"model": "sasrec", "seed": 2, "test/ndcg@10": 0.2}]
    assert out.read_text() == table(saved)  # the table of the three finished runs is on disk

    ran.clear()
    rows = run_grid(out, grid(["sasrec", "hstu"], [1, 2, 3], ran), table)
    assert ran == [("hstu", 2), ("sasrec", 3), ("hstu", 3)]
    assert [(r["model"], r["seed"]) for r in rows] == [("sasrec", 1), ("hstu", 1), ("sasrec", 2), ("hstu", 2),
                                                       ("sasrec", 3), ("hstu", 3)]
    assert json.loads(out.with_suffix(".json").read_text()) == rows
    assert out.read_text() == table(rows) == (
        "caption\n\n| model | seeds | NDCG@10 |\n|---|---:|---:|\n"
        "| sasrec | 3 | 0.2000 ± 0.1000 |\n| hstu | 3 | 0.2000 ± 0.1000 |\n")

    ran.clear()
    assert run_grid(out, grid(["sasrec", "hstu"], [1, 2, 3], ran), table) == rows and ran == []
