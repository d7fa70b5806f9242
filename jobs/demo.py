"""Recipe: the end-to-end demo on the embedded default (synthetic events, local Ray, sqlite MLflow).

    python jobs/demo.py --config configs/demo.yaml [--ranker-config configs/demo-ranker.yaml]

Prepares the data, shows one user in the interleaved layout, trains the retrieval model (a
small HSTU) and a GR ranker on the same data with Ray Train, evaluates both registered models
on the test split against the generator's optimum, then serves them as one app with Ray
Serve (retrieval, then M-FALCON ranking), asks it a few questions over HTTP (what the ranker
changed, an event, a new user) and prints the answers and the URLs. Every run is a fresh
one (its own Train runs and event log) unless --resume names an earlier run's start time.
`--set` overrides apply to both configs (data.* keys must, for both models to share the data).
"""

import json
import secrets
import time
import urllib.request

from genrec.config import ConfigError, load_config
from genrec.data.loader import BatchSpec, iter_torch_batches
from genrec.data.pipeline import prepare
from genrec.data.prepared import read_manifest, read_split
from genrec.data.summary import summary_text
from genrec.data.synthetic import oracle_ratio_text
from genrec.runtime import init_ray, load_job_config, run_job, stop_serving_and_ray
from genrec.serve.deploy import load_serve_file, start
from genrec.train.tracking import tracking_uri
from genrec.train.trainer import evaluate_model, fit


def main(args) -> int:
    stamp = args.resume or time.strftime("%Y%m%d-%H%M%S")
    retrieval_cfg, ranker_cfg = (fresh_run(cfg, stamp) for cfg in demo_configs(args))
    init_ray(retrieval_cfg.ray)
    print(summary_text(prepare(retrieval_cfg.data)))
    show_interleaved_user(retrieval_cfg)
    oracle = read_manifest(retrieval_cfg.data.output_dir).get("synthetic_oracle") or {}
    retrieval_uri = train_and_evaluate(retrieval_cfg, oracle)
    ranker_uri = train_and_evaluate(ranker_cfg, oracle)
    serve_and_ask(retrieval_cfg, retrieval_uri, ranker_uri, events_db=f"outputs/serve/demo-{stamp}/events.sqlite")
    return 0


def demo_configs(args):
    """The retrieval model's config and the ranker's, the same --set on both; they must share the data."""
    retrieval_cfg = load_job_config(args)
    ranker_cfg = load_config(args.ranker_config, args.overrides)
    if ranker_cfg.data.model_copy(update={"overwrite": False}) != retrieval_cfg.data.model_copy(
            update={"overwrite": False}):
        raise ConfigError(f"{args.ranker_config}: its data section differs from {args.config}'s; the ranker "
                          "must be trained on the same prepared data as the retrieval model (the same item ids)")
    return retrieval_cfg, ranker_cfg.model_copy(update={"data": ranker_cfg.data.model_copy(
        update={"overwrite": False})})


def fresh_run(cfg, stamp: str):
    """The run named after the demo's start: a re-run never resumes another demo's checkpoints."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"run_name": f"{cfg.train.run_name or cfg.name}-{stamp}"})})


def train_and_evaluate(cfg, oracle: dict) -> str:
    """Train, register, evaluate the registered model on the test split; print it against the optimum."""
    result = fit(cfg)
    uri = f"models:/{result['registered_model']}/{result['version']}"
    metrics = evaluate_model(cfg, uri, "test")
    count = metrics.pop("count", None)
    print(f"== {uri} ({cfg.model.kind}) on the test split{f' ({count:.0f} users, full ranking)' if count else ''} ==")
    if cfg.model.kind == "gr":
        actions = oracle.get("test", {}).get("actions", {})
        for task in cfg.ranking.tasks:
            best = actions.get(task.action) or {}
            versus = (f"   (the oracle: NE {best['oracle_ne']:.4f} AUC {best['oracle_auc']:.4f})"
                      if best.get("oracle_ne") is not None else "")
            print(f"  {task.name:12s} NE {metrics[f'{task.name}/ne']:.4f} AUC {metrics[f'{task.name}/auc']:.4f}"
                  + versus)
    else:
        print("  " + "  ".join(f"{k.upper()} {v:.4f}" for k, v in metrics.items()))
        if oracle:  # the generator knows the best achievable score
            print(f"  vs the generator's optimum: {oracle_ratio_text(metrics, oracle)}")
    return uri


def serve_and_ask(cfg, retrieval_uri: str, ranker_uri: str, events_db: str) -> None:
    """Start the Serve app (configs/serve/demo.yaml) on the two models just registered, ask it a few
    questions over HTTP, print the answers and the URLs, shut it down (`make serve` keeps it up)."""
    token = secrets.token_urlsafe(24)  # this run's write token; `make serve` reads GENREC_SERVE_TOKEN
    mlflow_uri = tracking_uri(cfg)
    tree = load_serve_file("configs/serve/demo.yaml", [
        f"model.uri={retrieval_uri}", f"model.tracking_uri={mlflow_uri}", f"ranker.uri={ranker_uri}",
        f"ranker.tracking_uri={mlflow_uri}", f"auth.token={token}", f"store.events_db={events_db}"])
    url = start(tree)

    def ask(path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json",
                                                                           **(headers or {})})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    try:
        user = ask("/v1/users?limit=1")[0]
        print(f"== serving {retrieval_uri} (retrieval) + {ranker_uri} (ranking, M-FALCON) at {url} ==")
        history = ask(f"/v1/users/{user}/history?limit=3")["events"]
        print(f"  user {user}, last events: " + ", ".join(f"{e['item_id']} ({e['action']})" for e in history))
        show_what_the_ranker_changed(ask, user)
        answer = ask("/v1/recommend", {"user_id": user, "k": 5})
        item = answer["items"][0]["item_id"]
        ask("/v1/events", {"user_id": user, "events": [{"item_id": item, "action": "purchase"}]},
            {"authorization": f"Bearer {token}"})
        answer = ask("/v1/recommend", {"user_id": user, "k": 5})
        print(f"  POST /v1/events (user {user} purchased {item}), then /v1/recommend again "
              f"(the ranker's M-FALCON cache {answer['cache']}){show(answer)}")
        answer = ask("/v1/recommend", {"user_id": "someone-new", "k": 3})
        print(f"  POST /v1/recommend {{user_id: someone-new, k: 3}}{show(answer)}")
        print(f"  the page: {url}/?user={user}   API docs: {url}/docs   health: {url}/healthz")
        print(f"  MLflow UI: .venv/bin/mlflow ui --backend-store-uri {mlflow_uri} (then http://127.0.0.1:5000)")
        print("  (the demo stops the app now; `make serve` keeps it up)")
    finally:
        stop_serving_and_ray()


def show_what_the_ranker_changed(ask, user) -> None:
    """The retrieval model's top items for a user, and the order the ranker gives the retrieved set."""
    retrieved = ask("/v1/retrieve", {"user_id": user, "k": 200})["items"]
    position = {i["item_id"]: n for n, i in enumerate(retrieved, 1)}
    answer = ask("/v1/recommend", {"user_id": user, "k": 5})
    print(f"  retrieval's top 5 (of 200 retrieved): {[i['item_id'] for i in retrieved[:5]]}")
    print(f"  POST /v1/recommend {{user_id: {user}, k: 5}}: the ranker's top 5 of those 200 "
          f"(retrieval position in brackets; weighted score = sum of task weights x predictions){show(answer)}")
    print("    " + "  ".join(f"{i['item_id']} [{position.get(i['item_id'], '-')}]" for i in answer["items"]))


def show(answer: dict) -> str:
    if answer["cold_start"]:
        return " (cold start: popular items)\n" + "\n".join(f"    {i['item_id']:>6}" for i in answer["items"])
    return "\n" + "\n".join(
        f"    {i['item_id']:>6}  {', '.join(i['genres'] or [])[:20]:20s} score {i['score']:.3f}  "
        + " ".join(f"{t} {v:.3f}" for t, v in (i["scores"] or {}).items()) for i in answer["items"])


def show_interleaved_user(cfg) -> None:
    spec = BatchSpec.from_prepared(cfg.data.output_dir, "interleaved", cfg.kept_items)
    batch = next(iter_torch_batches(read_split(cfg.data.output_dir, "train"), spec, batch_size=1, seed=0))
    print(f"user {int(batch['users'][0])} in the interleaved layout (context tokens, then item, action, ...):")
    for key in ("token_types", "item_ids", "target_ids", "target_actions"):
        print(f"  {key:15s} {batch[key][:12].tolist()}")


def arguments(parser) -> None:
    parser.add_argument("--ranker-config", default="configs/demo-ranker.yaml",
                        help="the GR ranker trained beside the retrieval model (default configs/demo-ranker.yaml)")
    parser.add_argument("--resume", metavar="STAMP", default=None,
                        help="resume the demo that started at STAMP (its run names end in it, e.g. 20261206-211500)")


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0], extra=arguments)
