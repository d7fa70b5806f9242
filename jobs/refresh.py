"""Recipe: keep a registered model fresh: continue it on the events since its data cutoff, move its alias if not worse.

    python jobs/refresh.py --config configs/refresh-demo.yaml     # the demo model, from its Serve app's event log
    ray job submit --working-dir . -- python jobs/refresh.py --config my-refresh.yaml

The config is the experiment's (data.source: where new event files appear; train, eval, tracking, Ray) with a
`refresh:` section: the model (models:/<name>@<alias>), the sources (new files of data.source, a Serve app's
events_db), the chunks and the gate. The model's own shape comes from the registered version. Run it on a
schedule: a refresh with nothing new since the cutoff does nothing. benchmarks/refresh_rounds.py writes such
a config for a CSV event log that grows by new files (outputs/bench-refresh/<world>/<model>-seed<seed>/refresh-job.yaml).

Exit status: 0 when the alias moved to the new version (or nothing was new), 3 when the gate kept the alias
on the current version (the new version is registered, tagged with why), 2 for a user error (one line).
"""

import json

from genrec.errors import GenrecError
from genrec.runtime import init_ray, load_job_config, run_job
from genrec.train.refresh import GATE_KEPT_EXIT, KEPT, refresh
from genrec.train.trainer import check_storage


def main(args) -> int:
    cfg = load_job_config(args)
    if cfg.refresh is None:
        raise GenrecError(f"{args.config}: no refresh section (refresh.model: models:/<name>@<alias>, ...)")
    check_storage(cfg)  # before Ray starts
    init_ray(cfg.ray)
    result = refresh(cfg)
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "current_windows")}, indent=1))
    return GATE_KEPT_EXIT if result["outcome"] == KEPT else 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
