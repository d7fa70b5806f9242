"""Recipe: raw event log -> validated events -> per-user sequences, splits and manifest.

    python jobs/prepare.py --config configs/ml-1m/data.yaml [--set data.overwrite=true]
    ray job submit --working-dir . -- python jobs/prepare.py --config configs/demo.yaml

On a cluster whose nodes share no disk, read from and write to an object store (credentials from the
AWS chain, AWS_ENDPOINT_URL for an S3-compatible store):
    ... --set data.source.path=s3://bucket/logs/2026-12- --set data.output_dir=s3://bucket/genrec/data/logs
"""

from genrec.data.pipeline import plan_before_ray, prepare
from genrec.data.summary import summary_text
from genrec.runtime import init_ray, load_job_config, run_job


def main(args) -> int:
    cfg = load_job_config(args)
    plan = plan_before_ray(cfg.data)  # a missing or malformed file is reported before Ray takes seconds to start
    init_ray(cfg.ray)
    summary = prepare(cfg.data, plan=plan)
    print(summary_text(summary))
    return 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
