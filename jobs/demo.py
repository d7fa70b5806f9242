"""Recipe: the end-to-end demo on the embedded default (synthetic events, local Ray, sqlite MLflow).

    python jobs/demo.py --config configs/demo.yaml

Prepares the data, shows one user in the interleaved layout, trains a small HSTU
with Ray Train for a few minutes on CPU, evaluates the registered model on the
test split, then serves it with Ray Serve, asks it a few questions over HTTP (recommend,
an event, recommend again, a new user) and prints the answers and the URLs.
"""

import json
import secrets
import urllib.request

from genrec.data.loader import BatchSpec, iter_torch_batches
from genrec.data.pipeline import prepare
from genrec.data.prepared import read_manifest, read_split
from genrec.data.summary import summary_text
from genrec.data.synthetic import oracle_ratio_text
from genrec.runtime import init_ray, load_job_config, run_job
from genrec.serve.deploy import load_serve_file, start
from genrec.train.tracking import tracking_uri
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
    serve_and_ask(cfg, model_uri)
    return 0


def serve_and_ask(cfg, model_uri: str) -> None:
    """Start the Serve app (configs/serve/demo.yaml) on the model just registered, ask it a few
    questions over HTTP, print the answers and the URLs, shut it down (`make serve` keeps it up)."""
    from ray import serve

    token = secrets.token_urlsafe(24)  # this run's write token; `make serve` reads GENREC_SERVE_TOKEN
    tree = load_serve_file("configs/serve/demo.yaml", [f"model.uri={model_uri}", f"auth.token={token}",
                                                       f"model.tracking_uri={tracking_uri(cfg)}"])
    url = start(tree)

    def ask(path: str, body: dict | None = None, headers: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json",
                                                                           **(headers or {})})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def show(answer: dict) -> str:
        flag = " (cold start: popular items)" if answer["cold_start"] else ""
        return f"{flag}\n" + "\n".join(f"    {i['item_id']:>6}  {', '.join(i['genres'] or [])[:30]:30s} "
                                        f"score {i['score']:.3f}" for i in answer["items"])

    try:
        user = ask("/v1/users?limit=1")[0]
        print(f"== serving {model_uri} at {url} ==")
        history = ask(f"/v1/users/{user}/history?limit=3")["events"]
        print(f"  user {user}, last events: " + ", ".join(f"{e['item_id']} ({e['action']})" for e in history))
        answer = ask("/v1/recommend", {"user_id": user, "k": 5})
        print(f"  POST /v1/recommend {{user_id: {user}, k: 5}}{show(answer)}")
        item = answer["items"][0]["item_id"]
        ask("/v1/events", {"user_id": user, "events": [{"item_id": item, "action": "like"}]},
            {"authorization": f"Bearer {token}"})
        answer = ask("/v1/recommend", {"user_id": user, "k": 5})
        print(f"  POST /v1/events (user {user} liked {item}), then /v1/recommend again "
              f"(M-FALCON cache {answer['cache']}){show(answer)}")
        answer = ask("/v1/recommend", {"user_id": "someone-new", "k": 3})
        print(f"  POST /v1/recommend {{user_id: someone-new, k: 3}}{show(answer)}")
        print(f"  the page: {url}/   API docs: {url}/docs   health: {url}/healthz")
        print(f"  MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri(cfg)} (then http://127.0.0.1:5000)")
        print("  (the demo stops the app now; `make serve` keeps it up)")
    finally:
        serve.shutdown()


def show_interleaved_user(cfg) -> None:
    spec = BatchSpec.from_prepared(cfg.data.output_dir, "interleaved", cfg.kept_items)
    batch = next(iter_torch_batches(read_split(cfg.data.output_dir, "train"), spec, batch_size=1, seed=0))
    print(f"user {int(batch['users'][0])} in the interleaved layout (context tokens, then item, action, ...):")
    for key in ("token_types", "item_ids", "target_ids", "target_actions"):
        print(f"  {key:15s} {batch[key][:12].tolist()}")


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0])
