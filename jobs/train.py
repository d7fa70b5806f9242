"""Recipe: train an encoder on prepared data with Ray Train, track and register it in MLflow.

    python jobs/train.py --config configs/ml-1m/hstu.yaml [--set train.epochs=5]
    ray job submit --working-dir . -- python jobs/train.py --config configs/ml-1m/hstu.yaml

The data must be prepared first (jobs/prepare.py with the same config). Re-running
with the same train.run_name resumes from the last checkpoint.
"""

import json

from genrec.runtime import init_ray, load_job_config, run_job
from genrec.train.tracking import check_registered_kind
from genrec.train.trainer import check_storage, fit


def main(args) -> int:
    cfg = load_job_config(args)
    check_storage(cfg)  # fit checks these too; here a refusal comes before Ray starts
    check_registered_kind(cfg)
    init_ray(cfg.ray)
    result = fit(cfg)
    print(json.dumps({k: result[k] for k in ("run_name", "registered_model", "version", "epochs_run", "best",
                                                  "test_epochs")}, indent=1))
    return 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
