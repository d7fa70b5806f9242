"""Recipe: the whole loop on the demo world: serve -> events (new items among them) -> refresh -> rollout.

    make demo                # trains and registers demo-hstu
    make loop                # = python jobs/loop_demo.py --config configs/refresh-demo.yaml

1. `@production` of demo-hstu names its latest version (set here if it names none).
2. The Serve app starts on models:/demo-hstu@production with model.watch_s, its event log the one the
   refresh reads (refresh.events_db).
3. --users stored users each post --events events over HTTP, after the model's cutoff, walking a ring of
   --new-items items the catalog has never had: /v1/events logs them for the next refresh (new_items).
4. jobs/refresh.py's refresh: the vocabulary grows, the model continues one pass, the gate decides.
5. When the alias moved, the app rolls the new version out by itself; a walk through the new items then
   retrieves new items.
Exit 0 when the new version went live and answered with new items, 3 when the gate kept the alias.
"""

import secrets
import time

import pyarrow as pa
import pyarrow.compute as pc
from mlflow.tracking import MlflowClient

from genrec.runtime import init_ray, load_job_config, run_job, stop_serving_and_ray
from genrec.serve.client import connect
from genrec.serve.deploy import load_serve_file, start
from genrec.train import tracking
from genrec.train.refresh import (GATE_KEPT_EXIT, PROMOTED, current_model, current_vocabulary, refresh,
                                  registered_alias)
from genrec.train.streaming import DAY


def ensure_alias(cfg) -> None:
    name, alias = registered_alias(cfg)
    client = MlflowClient(tracking.tracking_uri(cfg))
    if alias not in client.get_registered_model(name).aliases:
        latest = max(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        client.set_registered_model_alias(name, alias, str(latest))
        print(f"[loop] {name}@{alias} -> version {latest} (the latest)")


def serve_following(cfg, serve_config: str, token: str) -> str:
    tree = load_serve_file(serve_config, [
        f"model.uri={cfg.refresh.model}", f"model.tracking_uri={tracking.tracking_uri(cfg)}", "model.watch_s=2",
        f"store.events_db={cfg.refresh.events_db}", f"auth.token={token}",
        *(f"deployments.{d}.{key}" for d in ("Ingress", "Retrieval", "Ranking")
          for key in ("num_replicas=1", "autoscaling_config=null"))])
    return start(tree)


def new_item_ids(vocab, count: int) -> list:
    """Raw ids the catalog has never had, of its id type."""
    ids = vocab.items["item_id"]
    if pa.types.is_integer(ids.type):
        largest = pc.max(ids).as_py()
        return [largest + 1 + k for k in range(count)]
    return [f"new-item-{k}" for k in range(count)]


def post_walks(http, users: list[str], ring: list, events: int, cutoff: int, span_days: float) -> int:
    """Each user clicks `events` consecutive items of the ring (from its own place), spread over the span after
    the cutoff, so that every chunk of the refresh holds events -> the events logged."""
    step = span_days * DAY / events
    logged = 0
    for j, user in enumerate(users):
        walk = [{"item_id": ring[(j + k) % len(ring)], "timestamp": int(cutoff + 1 + k * step + j)}
                for k in range(events)]
        answer = http.post("/v1/events", json={"user_id": user, "events": walk})
        answer.raise_for_status()
        logged += answer.json()["appended"]
    return logged


def wait_for_version(http, version: str, timeout_s: float = 180) -> dict:
    deadline = time.time() + timeout_s
    while (live := http.get("/v1/model").json())["version"] != version:
        if time.time() > deadline:
            raise TimeoutError(f"the app still serves version {live['version']} after {timeout_s:.0f} s")
        time.sleep(1)
    return live


def main(args) -> int:
    cfg = load_job_config(args)
    ensure_alias(cfg)
    current = current_model(cfg)
    ring = new_item_ids(current_vocabulary(current), args.new_items)
    init_ray(cfg.ray)
    token = secrets.token_urlsafe(24)
    try:
        url = serve_following(cfg, args.serve_config, token)
        with connect(url, token) as http:
            print(f"[loop] serving {cfg.refresh.model} (version {http.get('/v1/model').json()['version']}) at {url}")
            users = http.get("/v1/users", params={"limit": args.users}).json()
            logged = post_walks(http, users, ring, args.events, current.cutoff, args.span_days)
            print(f"[loop] {len(users)} users posted {logged:,} events on {len(ring)} items the model does not know "
                  f"({ring[0]}..{ring[-1]})")
            result = refresh(cfg)
            if result["outcome"] != PROMOTED:
                print(f"[loop] the gate kept the alias: {result['reason']}")
                return GATE_KEPT_EXIT
            wait_for_version(http, result["version"])
            walk = [{"item_id": item, "timestamp": current.cutoff + 1 + k} for k, item in enumerate(ring[:5])]
            answer = http.post("/v1/retrieve", json={"history": walk, "k": 10}).json()
            found = [i["item_id"] for i in answer["items"] if i["item_id"] in set(ring)]
            print(f"[loop] the app went to version {result['version']} by itself; after a walk through "
                  f"{ring[:5]} it retrieves {len(found)} new items of 10: {found}")
            return 0 if found else 1
    finally:
        stop_serving_and_ray()


def arguments(parser) -> None:
    parser.add_argument("--serve-config", default="configs/serve/demo.yaml", help="the Serve app's file")
    parser.add_argument("--users", type=int, default=200, help="stored users who post events")
    parser.add_argument("--events", type=int, default=12, help="events each posts")
    parser.add_argument("--new-items", type=int, default=20, help="items never seen, in a ring the users walk")
    parser.add_argument("--span-days", type=float, default=4.0, help="the posted events' span after the cutoff")


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0], extra=arguments)
