"""The result tables the recipes write (jobs/rank_compare.py, jobs/reproduce.py): the arithmetic a
reader trusts (mean ± std over seeds, the relative column against the baseline, the oracle row)."""

import importlib.util
import statistics

from conftest import REPO

from genrec.config import load_config


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ranking_row(variant: str, seed: int, ne: float, auc: float) -> dict:
    tasks = ["click", "like", "add_to_cart", "share", "purchase"]
    return {"variant": variant, "seed": seed, "epochs": 10, "best_epoch": 8, "impressions_per_s": 1000.0 * seed,
            "train_s_per_epoch": 5.0, **{f"test/{t}/ne": ne + 0.01 * k for k, t in enumerate(tasks)},
            **{f"test/{t}/auc": auc for t in tasks}}


def test_rank_compare_table_reports_mean_ne_against_the_dlrm_and_the_oracle():
    rank_compare = load_job("rank_compare")
    cfg = load_config(REPO / "configs/synthetic/multi-action.yaml")
    rows = [ranking_row("gr", 1, 0.90, 0.70), ranking_row("gr", 2, 0.92, 0.72),
            ranking_row("dlrm", 1, 0.95, 0.60), ranking_row("dlrm", 2, 0.97, 0.62)]
    oracle = {"test": {"actions": {t.action: {"oracle_auc": 0.8, "oracle_ne": 0.7} for t in cfg.ranking.tasks}}}
    text = rank_compare.table(rows, cfg, oracle)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    # mean NE over the 5 tasks: gr 0.93, dlrm 0.98 -> gr is 5.1% lower
    assert "| -5.1% |" in lines["gr"]
    assert "| +0.0% |" in lines["dlrm"]
    # click NE of gr: seeds 0.90 and 0.92 -> mean 0.91, sample std 0.0141
    assert f"0.9100 ± {statistics.stdev([0.90, 0.92]):.4f}" in lines["gr"]
    assert lines["gr"].split(" | ")[1] == "2"
    assert "0.8000 | 0.7000" in lines["oracle (true action probabilities)"]
    assert "leave-one-out" in text.splitlines()[0]
    # no oracle for a source without one, and no DLRM rows -> no relative column
    text = rank_compare.table(rows[:2], cfg, None)
    assert "oracle" not in text and "| - | " in text


def test_stream_table_compares_hr50_with_the_first_model_and_shows_the_oracle():
    reproduce = load_job("reproduce")
    def row(model, seed, hr50):
        return {"model": model, "seed": seed, "epochs": 54, "train_s_per_epoch": 2.0, "valid_eval_s": 1.0,
                "wall_s": 300.0, "stream/hr@10": hr50 / 3, "stream/hr@50": hr50, "stream/ndcg@10": hr50 / 6,
                "oracle/hr@10": 0.18, "oracle/hr@50": 0.36}
    rows = [row("sasrec", 1, 0.14), row("sasrec", 2, 0.16), row("hstu", 1, 0.12), row("hstu", 2, 0.12)]
    text = reproduce.table(rows)
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| +0.0% |" in lines["sasrec"] and "| -20.0% |" in lines["hstu"]  # 0.12 / 0.15 - 1
    assert "0.1800" in lines["hstu"] and "0.3600" in lines["hstu"]
    assert "| 5.0 |" in lines["hstu"]  # wall minutes per run
