"""Recipe: a scaling sweep (or hyper-parameter search) with Ray Tune over Ray Train trials.

    python jobs/sweep.py --config configs/sweeps/ml-1m.yaml [--set sweep.max_concurrent_trials=2]
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweeps/ml-1m.yaml

The data must be prepared first (jobs/prepare.py with the same config). Re-running the
same sweep (same sweep.name) continues with the trials not yet done.
"""

import json

from genrec.runtime import init_ray, load_job_config, run_job
from genrec.train.sweep import run_sweep


def main(args) -> int:
    cfg = load_job_config(args)
    init_ray(cfg.ray)
    summary = run_sweep(cfg)
    fits = {family: {k: getattr(law, k) for k in ("a", "b", "c", "a_err", "b_err", "c_err", "points")}
            for family, law in summary["fits"].items()}
    print(json.dumps({"csv": summary["csv"], "plot": summary["plot"], "best_config": summary["best_config"],
                      "fits": fits, "interrupted": summary["interrupted"]}, indent=1))
    return 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
