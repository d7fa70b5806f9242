"""Model selection that cannot fail silently, and early stopping that does not stop an untrained
ranker: a multi-action CSV log with a time split, where one action ('buy') only ever happens
before the cutoff, so no validation target has it."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from genrec.config import ConfigError, ExperimentConfig
from genrec.train.loop import STOP_REQUEST, NoModelSelectedError, patience_started

DAY, START = 86_400, 1_700_000_000


def write_log(path, users=60, events=12, seed=0):
    """Each user: `events` events a day apart; 'buy' only in the first half (before the cutoff)."""
    rng = np.random.default_rng(seed)
    lines = ["user,item,action,ts"]
    for user in range(1, users + 1):
        for k in range(events):
            action = "buy" if k < events // 2 and rng.random() < 0.25 else rng.choice(["click", "skip"], p=[0.3, 0.7])
            lines.append(f"{user},{rng.integers(1, 40)},{action},{START + k * DAY + user}")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def shop(ray_cluster, tmp_path_factory):
    from genrec.data.pipeline import prepare

    root = tmp_path_factory.mktemp("selection")
    write_log(root / "log.csv")
    cfg = ExperimentConfig.model_validate({
        "name": "shop-gr",
        "data": {"source": {"kind": "csv", "path": str(root / "log.csv"),
                            "columns": {"user_id": "user", "item_id": "item", "timestamp": "ts", "action": "action"},
                            "actions": {"names": ["click", "skip", "buy"]}},
                 "output_dir": str(root / "data"), "num_partitions": 2,
                 "split": {"kind": "time", "cutoff": START + 6 * DAY - 1}},
        "model": {"kind": "gr", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0, "max_seq_len": 8},
        "batching": {"layout": "interleaved"},
        "ranking": {"tasks": [{"name": "click", "action": "click"}, {"name": "buy", "action": "buy"}]},
        "train": {"epochs": 1, "batch_size": 32, "num_negatives": 8, "storage_path": str(root / "runs"),
                  "cpus_per_worker": 0.5, "threads_per_worker": 1, "seed": 1},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "tests"},
    })
    prepare(cfg.data, log=lambda *_: None)
    return cfg, root


def variant(cfg, name, tasks=None, eval_every=None, **train):
    out = cfg.model_copy(deep=True)
    out.name = name
    out.train = out.train.model_copy(update={"run_name": name, **train})
    if tasks is not None:
        out.ranking = out.ranking.model_validate({"tasks": tasks})
    if eval_every:
        out.eval = out.eval.model_copy(update={"every": eval_every})
    return out


def registered(cfg, prefix):
    """Versions registered under a name that starts with `prefix` (the run's name, whatever suffix it gets)."""
    client = MlflowClient(cfg.tracking.tracking_uri)
    return [v for m in client.search_registered_models() if m.name.startswith(prefix)
            for v in client.search_model_versions(f"name = '{m.name}'")]


def test_a_task_without_positives_among_the_validation_targets_is_named_and_left_out_of_selection(shop):
    from genrec.train.trainer import fit

    cfg, _ = shop
    lines = []
    result = fit(variant(cfg, "shop-two-tasks"), log=lines.append)
    warning = next(line for line in lines if line.startswith("[train] warning: task 'buy'"))
    assert "has 0 positives of" in warning and "left out of model selection" in warning and "'click'" in warning
    (epoch,) = result["history"]
    assert epoch["valid/buy/ne"] != epoch["valid/buy/ne"]  # nan: one class among the targets
    assert epoch["valid/ne_gain"] == pytest.approx(1 - epoch["valid/click/ne"])  # selected on click alone
    assert result["best"]["best_epoch"] == 1 and registered(cfg, "shop-two-tasks")


def test_a_run_no_task_could_select_is_refused_before_training_naming_the_counts(shop):
    from genrec.train.trainer import fit

    cfg, root = shop
    only_buy = variant(cfg, "shop-buy-only", tasks=[{"name": "buy", "action": "buy"}])
    with pytest.raises(ConfigError, match=r"no binary task has both positives and negatives among the \d+ validation "
                                          r"targets .*task 'buy': 0 positives of \d+ labelled"):
        fit(only_buy, log=lambda *_: None)
    assert not (root / "runs" / "shop-buy-only").exists()


def test_a_run_that_selected_no_model_registers_none_and_fails(shop):
    """A stop (e.g. a sweep scheduler's) before the first evaluation: before, the untrained weights were
    registered and the job exited 0."""
    from genrec.train.trainer import fit

    cfg, root = shop
    run = variant(cfg, "shop-stopped", epochs=4, eval_every=2)
    (root / "runs" / "shop-stopped").mkdir(parents=True)
    (root / "runs" / "shop-stopped" / STOP_REQUEST).write_text("stopped early (scheduler): test")
    with pytest.raises(NoModelSelectedError, match=r"selected no model: no evaluation ran in its 1 epoch\(s\) "
                                                   r"\(eval.every=2\); it was asked to stop \(stopped early "
                                                   r"\(scheduler\): test\); nothing was registered"):
        fit(run, log=lambda *_: None)
    assert not registered(cfg, "shop-stopped")


def test_patience_starts_once_the_ranker_beats_the_base_rate(shop):
    from genrec.train.trainer import fit

    cfg, _ = shop
    assert not patience_started(cfg, {}) and not patience_started(cfg, {"valid/ne_gain": -0.02})
    assert patience_started(cfg, {"valid/ne_gain": 0.01})
    retrieval = ExperimentConfig.model_validate({"data": {"source": {"kind": "synthetic"}}, "model": {"kind": "hstu"}})
    assert patience_started(retrieval, {})
    # a ranker that does not learn (lr ~ 0) stays at NE >= 1: patience 1 stopped it after epoch 2 before;
    # now it runs its epochs, since it never beat the base rate
    frozen = fit(variant(cfg, "shop-frozen", epochs=3, lr=1e-12, early_stopping_patience=1), log=lambda *_: None)
    assert [h["valid/click/ne"] >= 1 for h in frozen["history"]] == [True] * 3
    assert frozen["epochs_run"] == 3
