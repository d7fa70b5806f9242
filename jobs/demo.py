"""Recipe: the end-to-end demo on the embedded default (synthetic events, local Ray, sqlite MLflow).

    python jobs/demo.py --config configs/demo.yaml

Prepares the data, shows one user in the interleaved layout, trains a small HSTU
with Ray Train for a few minutes on CPU, evaluates the registered model on the
test split and prints how to browse the run in MLflow.
"""

from genrec.data.loader import BatchSpec, iter_torch_batches
from genrec.data.pipeline import prepare
from genrec.data.prepared import read_manifest, read_split
from genrec.data.summary import summary_text
from genrec.data.synthetic import oracle_ratio_text
from genrec.runtime import init_ray, load_job_config, run_job
from genrec.train.trainer import evaluate_model, fit


def main(args) -> int:
    cfg = load_job_config(args)
    init_ray(cfg.ray)
    print(summary_text(prepare(cfg.data)))
    show_interleaved_user(cfg)
    result = fit(cfg)
    model_uri = f"models:/{result['registered_model']}/{result['version']}"
    metrics = evaluate_model(cfg, model_uri, "test")
    print(f"== {model_uri} on the test split (full ranking, {metrics.pop('count'):.0f} users) ==")
    print("  " + "  ".join(f"{k.upper()} {v:.4f}" for k, v in metrics.items()))
    oracle = read_manifest(cfg.data.output_dir).get("synthetic_oracle")
    if oracle:  # the generator knows the best achievable score
        print(f"  vs the generator's optimum: {oracle_ratio_text(metrics, oracle)}")
    return 0


def show_interleaved_user(cfg) -> None:
    spec = BatchSpec.from_prepared(cfg.data.output_dir, "interleaved", cfg.kept_items)
    batch = next(iter_torch_batches(read_split(cfg.data.output_dir, "train"), spec, batch_size=1, seed=0))
    print(f"user {int(batch['users'][0])} in the interleaved layout (context tokens, then item, action, ...):")
    for key in ("token_types", "item_ids", "target_ids", "target_actions"):
        print(f"  {key:15s} {batch[key][:12].tolist()}")


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
