"""Recipe: the end-to-end demo on the embedded default (synthetic events, local Ray).

    python jobs/demo.py --config configs/demo.yaml

Today it runs the data stage and prints its summary and one user's first tokens;
training, evaluation and serving join as their issues land.
"""

from prepare import summary_text

from genrec.data.loader import BatchSpec, iter_torch_batches, read_split
from genrec.data.pipeline import prepare
from genrec.runtime import init_ray, load_job_config, run_job


def main(args) -> int:
    cfg = load_job_config(args)
    init_ray(cfg.ray)
    summary = prepare(cfg.data)
    print(summary_text(summary))
    spec = BatchSpec.from_prepared(cfg.data.output_dir, cfg.data.layout, cfg.data.max_seq_len)
    batch = next(iter_torch_batches(read_split(cfg.data.output_dir, "train"), spec, batch_size=4, seed=0))
    first = int(batch["offsets"][1])
    print(f"first training batch ({cfg.data.layout} layout): {len(batch['users'])} users, "
          f"{len(batch['item_ids'])} tokens; user {int(batch['users'][0])} starts with:")
    keys = [k for k in ("token_types", "item_ids", "target_ids", "target_actions") if k in batch]
    for k in keys:
        print(f"  {k:15s} {batch[k][:min(first, 12)].tolist()}")
    return 0


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
