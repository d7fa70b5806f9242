"""train.lr_schedule: the factor of each step (genrec.train.optim.lr_factor), the config's refusals, and the
loop's steps (genrec.train.loop.train_one_epoch, on a tiny prepared world without Ray Train) taking the
schedule's lr, across a checkpoint and resume too."""

import math

import pytest
import torch

from genrec.config import ConfigError, ExperimentConfig, LrSchedule, load_config
from genrec.train.optim import lr_factor
from test_config import GOOD, write


def test_constant_is_one_at_every_step():
    assert all(lr_factor(step, 50, LrSchedule()) == 1.0 for step in range(60))


@pytest.mark.parametrize("kind", ["warmup_cosine", "warmup_linear"])
def test_warmup_ramps_to_one_then_decays_to_the_final_fraction_at_the_last_step(kind):
    schedule = LrSchedule(kind=kind, warmup_steps=4, final_lr_fraction=0.1)
    factors = [lr_factor(step, 21, schedule) for step in range(21)]
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]  # linear from 1/warmup, full lr on the first decay step
    assert factors[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))  # decreasing over the decay
    halfway = 0.5 * (1 + math.cos(math.pi / 2)) if kind == "warmup_cosine" else 0.5
    assert factors[12] == pytest.approx(0.1 + 0.9 * halfway)  # step 12: halfway from step 4 to step 20
    assert lr_factor(25, 21, schedule) == pytest.approx(0.1)  # past the planned steps: stays at the final lr


def test_no_warmup_starts_at_full_lr_and_warmup_linear_to_one_is_warmup_then_constant():
    assert lr_factor(0, 10, LrSchedule(kind="warmup_cosine")) == 1.0
    assert lr_factor(9, 10, LrSchedule(kind="warmup_cosine")) == pytest.approx(0.0)
    flat = LrSchedule(kind="warmup_linear", warmup_steps=2, final_lr_fraction=1.0)
    assert [lr_factor(step, 6, flat) for step in range(6)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]


def _config(tmp_path, text):
    return load_config(write(tmp_path, GOOD + text))


def test_config_errors_name_the_key(tmp_path):
    cfg = _config(tmp_path, "train: {lr_schedule: {kind: warmup_cosine, warmup_steps: 100, final_lr_fraction: 0.1}}")
    assert cfg.train.lr_schedule.warmup_steps == 100
    assert _config(tmp_path, "").train.lr_schedule.kind == "constant"
    with pytest.raises(ConfigError, match=r"train\.lr_schedule\.kind: .*'warmup_cosine'"):
        _config(tmp_path, "train: {lr_schedule: {kind: cosine}}")
    with pytest.raises(ConfigError, match=r"train\.lr_schedule\.warmup_steps: .*-1"):
        _config(tmp_path, "train: {lr_schedule: {kind: warmup_linear, warmup_steps: -1}}")
    with pytest.raises(ConfigError, match=r"train\.lr_schedule\.final_lr_fraction: .*1\.5"):
        _config(tmp_path, "train: {lr_schedule: {kind: warmup_linear, final_lr_fraction: 1.5}}")
    with pytest.raises(ConfigError, match=r"train\.lr_schedule\.warmup_steps=10 does nothing with "
                                          r"train\.lr_schedule\.kind='constant'"):
        _config(tmp_path, "train: {lr_schedule: {warmup_steps: 10}}")
    with pytest.raises(ConfigError, match=r"train\.lr_schedule\.kind='warmup_cosine' does not apply to "
                                          r"train\.mode='one_pass'"):
        _config(tmp_path, "train: {mode: one_pass, lr_schedule: {kind: warmup_cosine}}")


@pytest.fixture(scope="module")
def tiny(ray_cluster, tmp_path_factory):
    """A prepared synthetic world (Ray tasks prepare it) and a warmup + cosine config: 240 training users in
    batches of 32, 8 steps an epoch, 16 in the run."""
    from genrec.data.pipeline import prepare

    root = tmp_path_factory.mktemp("lr")
    cfg = ExperimentConfig.model_validate({
        "name": "lr",
        "data": {"source": {"kind": "synthetic", "num_users": 240, "num_items": 120, "mean_events_per_user": 20,
                            "num_shards": 2, "path": str(root / "raw")},
                 "output_dir": str(root / "data"), "num_partitions": 2},
        "model": {"kind": "hstu", "dim": 16, "num_blocks": 1, "num_heads": 1, "dropout": 0.0, "max_seq_len": 16},
        "train": {"epochs": 2, "batch_size": 32, "num_negatives": 16, "lr": 0.01, "seed": 3,
                  "lr_schedule": {"kind": "warmup_cosine", "warmup_steps": 3, "final_lr_fraction": 0.1}},
    })
    prepare(cfg.data, log=lambda *_: None)
    return cfg, root


def _worker(cfg, root):
    """What setup_and_resume builds for one worker (no Ray Train context needed to step it)."""
    from genrec.artifact import build_model
    from genrec.storage import location
    from genrec.train.batching import batch_spec
    from genrec.train.loop import Worker
    from genrec.train.optim import build_optimizer
    from genrec.train.sharding import item_table_names, optimizer_groups

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    t = cfg.train
    tables = [model.get_parameter(f"{name}.weight") for name in item_table_names(model)]
    optimizer = build_optimizer(optimizer_groups(model, []), tables, t.embedding_optimizer, lr=t.lr, betas=t.betas,
                                weight_decay=t.weight_decay)
    lrs = []
    optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    worker = Worker(cfg, 0, 1, torch.device("cpu"), model, model, optimizer, location(str(root / "run")),
                    batch_spec(cfg, training=True), batch_spec(cfg), False)
    return worker, lrs


def test_each_step_takes_the_schedules_lr_and_a_resume_takes_it_up_where_it_was(tiny, tmp_path):
    from genrec.data.prepared import read_split
    from genrec.train.checkpoint import Progress, restore, save_checkpoint
    from genrec.train.loop import planned_steps, train_one_epoch

    cfg, root = tiny
    t = cfg.train
    table = read_split(cfg.data.output_dir, "train")
    assert planned_steps(cfg, table) == 8
    expected = [t.lr * lr_factor(step, 16, t.lr_schedule) for step in range(16)]

    whole, lrs = _worker(cfg, root)
    metrics = [train_one_epoch(whole, epoch, table) for epoch in range(2)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[0] == pytest.approx(t.lr / 3) and lrs[-1] == pytest.approx(0.1 * t.lr)
    assert [m["train/lr"] for m in metrics] == [lrs[7], lrs[15]]

    first, _ = _worker(cfg, root)
    train_one_epoch(first, 0, table)
    save_checkpoint(tmp_path, first.core, first.optimizer, Progress(epoch=0, best_state={}))
    resumed, resumed_lrs = _worker(cfg, root)
    progress = restore(tmp_path, resumed.core, resumed.optimizer, dict(lr=t.lr, betas=t.betas,
                                                                     weight_decay=t.weight_decay))
    assert resumed.optimizer.param_groups[0]["lr"] == t.lr  # restore sets the config's; the next step, the schedule's
    train_one_epoch(resumed, progress.epoch + 1, table)
    assert resumed_lrs == lrs[8:]
    state, resumed_state = whole.core.state_dict(), resumed.core.state_dict()
    assert all(torch.equal(state[k], resumed_state[k]) for k in state)  # as the uninterrupted run
