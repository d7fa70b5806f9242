"""Benchmark: the Serve app under a bounded load on 127.0.0.1, and a replica killed during it.

    python benchmarks/serve_load.py [--config configs/serve/demo.yaml] [--set model.uri=...]
                                    [--requests 2000] [--concurrency 32] [--candidates 256] [--no-fault]

Starts the app of the Serve config file (default: the demo model; run `make demo` first) on a
local Ray cluster and sends, with an async httpx client, `--requests` requests at `--concurrency`
in flight to each of
  /v1/rank       a random known user and `--candidates` random catalog items
  /v1/recommend  a random known user, k = 10 (retrieve the configured N, rank them, top 10)
and reports QPS, latency percentiles, errors (anything but a 2xx, or no answer) and retried
model calls (the x-genrec-retries header). The baseline row of each endpoint is the same
requests one at a time (concurrency 1, a tenth of the requests): the ratio is what concurrency
and @serve.batch buy.

Fault: the app is redeployed with 2 replicas of Retrieval and Ranking (autoscaling off), and
one Ranking replica's process is SIGKILLed after a third of a /v1/recommend run; every request
must still get a 2xx (the ingress retries a call whose replica died). Exit status 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


async def run_load(url: str, path: str, bodies: list[dict], concurrency: int, on_progress=None) -> dict:
    """Send every body (POST url+path) with at most `concurrency` in flight -> timing and error counts."""
    latencies, errors, retried, statuses = [], 0, 0, {}
    queue = iter(enumerate(bodies))
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            nonlocal errors, retried, done
            for _, body in queue:
                start = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                    retried += int(response.headers.get("x-genrec-retries", 0))
                    errors += not response.is_success
                except httpx.HTTPError:
                    errors += 1
                    statuses["no answer"] = statuses.get("no answer", 0) + 1
                latencies.append(time.perf_counter() - start)
                done += 1
                if on_progress is not None:
                    on_progress(done)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"requests": len(bodies), "concurrency": concurrency, "qps": len(bodies) / wall,
            "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95), "p99": np.percentile(ms, 99),
            "errors": errors, "retried": retried, "statuses": statuses}


def bodies_for(path: str, users: list[str], items: list, n: int, candidates: int, rng: random.Random) -> list[dict]:
    if path == "/v1/rank":
        return [{"user_id": rng.choice(users), "candidates": rng.sample(items, candidates)} for _ in range(n)]
    return [{"user_id": rng.choice(users), "k": 10} for _ in range(n)]


def replica_processes(deployment: str) -> list[psutil.Process]:
    """This benchmark's Ray cluster's replica processes of a deployment (Ray names them in the title)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:genrec:{deployment}" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


def row(name: str, r: dict, baseline: dict | None) -> str:
    ratio = f"{r['qps'] / baseline['qps']:.1f}x" if baseline else "1.0x (baseline)"
    return (f"| {name} | {r['requests']} | {r['concurrency']} | {r['qps']:.1f} | {ratio} | {r['p50']:.1f} | "
            f"{r['p95']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['retried']} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "serve" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=256)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--no-fault", action="store_true", help="skip the killed-replica run")
    args = parser.parse_args()

    import ray
    from ray import serve

    from genrec.config import RayConfig
    from genrec.reports import machine
    from genrec.runtime import init_ray
    from genrec.serve.deploy import load_serve_file, start

    os.environ.setdefault("GENREC_SERVE_TOKEN", "benchmark-token-not-used-for-writes")
    tree = load_serve_file(args.config, args.overrides)
    init_ray(RayConfig(num_cpus=args.num_cpus))
    url = start(tree, port=args.port)
    rng = random.Random(0)
    info = httpx.get(f"{url}/v1/model", timeout=60).json()
    users = httpx.get(f"{url}/v1/users", params={"limit": 1000}, timeout=60).json()
    items = sorted({i["item_id"] for u in users[:200] for i in
                    httpx.get(f"{url}/v1/users/{u}/history", params={"limit": 100}, timeout=60).json()["events"]})
    candidates = min(args.candidates, len(items))
    print(f"model {info['name']} v{info['version']} ({info['kind']}, {info['num_items']} items, N = "
          f"{info['max_seq_len']}); {candidates} candidates per /v1/rank; {len(users)} users")
    print(f"machine: {machine()}, load average "
          f"{os.getloadavg()[0]:.1f}; Ray {ray.__version__}; the app's replicas share these CPUs with the client\n")
    print("| endpoint | requests | concurrency | QPS | vs baseline | p50 ms | p95 ms | p99 ms | errors | retried |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for path in ("/v1/rank", "/v1/recommend"):
        warm = bodies_for(path, users, items, 64, candidates, rng)
        asyncio.run(run_load(url, path, warm, 8))  # caches and lazy imports, not measured
        base = asyncio.run(run_load(url, path, bodies_for(path, users, items, max(1, args.requests // 10),
                                                          candidates, rng), 1))
        load = asyncio.run(run_load(url, path, bodies_for(path, users, items, args.requests, candidates, rng),
                                    args.concurrency))
        print(row(f"`{path}` one at a time", base, None))
        print(row(f"`{path}`", load, base))
        failed += base["errors"] + load["errors"]

    if not args.no_fault:
        app = tree["applications"][0]
        for name in ("Retrieval", "Ranking"):
            for d in app.setdefault("deployments", []):
                if d.get("name") == name:
                    d.pop("autoscaling_config", None)
                    d["num_replicas"] = 2
        url = start(tree, port=args.port)
        asyncio.run(run_load(url, "/v1/recommend", bodies_for("/v1/recommend", users, items, 64, candidates, rng), 8))
        victims = replica_processes("Ranking")
        assert len(victims) == 2, f"expected 2 Ranking replicas, found {len(victims)}"
        killed = []

        def kill_at_a_third(done: int) -> None:
            if not killed and done >= args.requests // 3:
                os.kill(victims[0].pid, signal.SIGKILL)
                killed.append(victims[0].pid)

        fault = asyncio.run(run_load(url, "/v1/recommend", bodies_for("/v1/recommend", users, items, args.requests,
                                                                      candidates, rng), args.concurrency,
                                     on_progress=kill_at_a_third))
        print(row("`/v1/recommend`, 2 replicas, one killed", fault, None).replace("1.0x (baseline)", "-"))
        print(f"\nkilled Ranking replica pid {killed[0]} after {args.requests // 3} requests: "
              f"{fault['errors']} requests lost, {fault['retried']} model calls retried on the other replica; "
              f"statuses {fault['statuses']}")
        failed += fault["errors"]
    serve.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
