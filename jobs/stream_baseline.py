"""Recipe: the popularity ranker on a one-pass run's own targets, the baseline beside its stream metrics.

    python jobs/stream_baseline.py --config configs/synthetic/large-catalog.yaml

For a `train.mode: one_pass` config: every window from the second on is ranked as the run ranks it
(the same events of the same eval.window_users sample, each against the whole catalog with the user's
recent items excluded, eval.ties), by each item's number of events before the window. Prints the
`stream/*` metrics to set beside the run's.
"""

import json

from genrec.data.prepared import SEQUENCES, read_split
from genrec.errors import GenrecError
from genrec.runtime import load_job_config, run_job
from genrec.train.batching import batch_spec
from genrec.train.streaming import popularity_stream


def main(args) -> int:
    cfg = load_job_config(args)
    if cfg.train.mode != "one_pass":
        raise GenrecError(f"{args.config}: train.mode is {cfg.train.mode!r}; the stream baseline needs 'one_pass'")
    sequences = read_split(cfg.data.output_dir, SEQUENCES)
    stream = popularity_stream(sequences, cfg.train.window_days, batch_spec(cfg), cfg.eval.batch_size, cfg.eval.ties,
                               cfg.eval.window_users)
    print(json.dumps({"baseline": "popularity (events before each window)", **stream}, indent=1))
    return 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
