"""Recipe: evaluate a registered model or a model folder on a split, as training evaluates its kind.

    python jobs/evaluate.py --config configs/ml-1m/hstu.yaml --model models:/ml-1m-hstu/1 --split test
    ray job submit --working-dir . -- python jobs/evaluate.py --config ... --model models:/<name>/<version>

hstu / sasrec get the full-ranking retrieval metrics; gr / dlrm per-task AUC / NE / log loss of their
own tasks (gr also retrieval at its action positions). The evaluation runs as one Ray task with the
CPUs of a training worker (train.cpus_per_worker), so on a cluster it lands on a worker node, never
on the head.
"""

import json

from genrec.errors import GenrecError
from genrec.runtime import init_ray, load_job_config, run_job
from genrec.train.trainer import evaluate_model, workers_view


def arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="models:/<name>/<version>, or a model folder (a path, or "
                        "an object-store URI: s3://bucket/.../model)")
    parser.add_argument("--split", default="test", choices=["valid", "test"])


def main(args) -> int:
    import ray

    cfg = load_job_config(args)
    init_ray(cfg.ray)
    task = ray.remote(evaluate_model).options(num_cpus=cfg.train.cpus_per_worker, max_retries=1)
    # absolute paths and the resolved tracking URI: the task runs in another directory, maybe on another node
    try:
        metrics = ray.get(task.remote(workers_view(cfg), args.model, args.split))
    except ray.exceptions.RayTaskError as err:  # a user error (bad model URI, split) reads as one line
        raise (err.cause if isinstance(err.cause, (GenrecError, FileNotFoundError)) else err) from None
    print(json.dumps({"model": args.model, "split": args.split, **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0], extra=arguments)
