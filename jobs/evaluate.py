"""Recipe: evaluate a registered model or a model folder on a split (full ranking).

    python jobs/evaluate.py --config configs/ml-1m/hstu.yaml --model models:/ml-1m-hstu/1 --split test
"""

import json

from genrec.runtime import load_job_config, run_job
from genrec.train.trainer import evaluate_model


def arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="models:/<name>/<version> or a model folder")
    parser.add_argument("--split", default="test", choices=["valid", "test"])


def main(args) -> int:
    cfg = load_job_config(args)
    metrics = evaluate_model(cfg, args.model, args.split)
    print(json.dumps({"model": args.model, "split": args.split, **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0], extra=arguments)
