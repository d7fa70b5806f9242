"""Benchmark: the Serve app under a bounded load on 127.0.0.1, replicas killed during it, and autoscaling.

    python benchmarks/serve_load.py [--config configs/serve/demo.yaml] [--set ranker.uri=models:/demo-gr/latest]
                                    [--requests 2000] [--concurrency 32] [--candidates 256]
                                    [--skip throughput,kills,autoscaling]

Starts the app of the Serve config file (default: the demo models; run `make demo` first; the file serves
models:/demo-hstu/latest alone unless `--set ranker.uri=models:/demo-gr/latest` adds the GR ranker) on a local
Ray cluster and sends requests with genrec's retrying client (genrec.serve.client, an async httpx client that
resends a request whose answer a dead replica lost), `--concurrency` in flight. The history store is a new
events file (the prepared data's histories alone, not a demo's events). Three tables:

Throughput (the config's deployments as they are): `--requests` requests to each of
  /v1/rank       a random known user and `--candidates` random catalog items
  /v1/recommend  a random known user, k = 10 (retrieve the configured N, rank them, top 10)
and the same requests one at a time (a tenth of them): the ratio is what concurrency and @serve.batch buy.

Kills: with 1 and with 2 replicas of every deployment (autoscaling off), a /v1/recommend load with no kill,
then one with a replica of Ingress, of Retrieval, of Ranking SIGKILLed after a third of the requests (the next
row starts once Serve has replaced it; "replaced" is the time from the kill until it runs again). lost =
requests with no 2xx after the client's resends (must be 0); resent = requests the client sent again (each would
have been lost without it: the proxy answers 500 for what was in flight on a dead Ingress replica); model calls
resent = by the ingress, on another model replica.

Autoscaling: every deployment from 1 replica (min 1, max `--max-replicas`, `--target` ongoing requests per
replica, short up/downscale delays); /v1/recommend at concurrency 1, then at `--concurrency` until the
deployments have scaled up (the replica counts over time), then again, then idle until they are back at 1.

Exit status 1 on any lost request, or when no deployment scaled up and back down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ("Ingress", "Retrieval", "Ranking")


async def run_load(url: str, path: str, bodies: list[dict], concurrency: int, on_progress=None) -> dict:
    """POST every body to url+path with at most `concurrency` in flight, through genrec's retrying client."""
    import httpx

    from genrec.serve.client import RETRIES_KEY, connect_async

    latencies, counts = [], {"lost": 0, "resent": 0, "model_resent": 0}
    statuses: dict = {}
    queue = iter(bodies)
    async with connect_async(url, timeout_s=60, max_connections=concurrency) as client:
        async def worker():
            for body in queue:
                start = time.perf_counter()
                try:
                    response = await client.post(path, json=body)
                    status = response.status_code
                    counts["resent"] += response.extensions[RETRIES_KEY] > 0
                    counts["model_resent"] += int(response.headers.get("x-genrec-retries", 0))
                except httpx.HTTPError as err:  # no answer, after the client's resends
                    status = type(err).__name__
                latencies.append(time.perf_counter() - start)
                statuses[status] = statuses.get(status, 0) + 1
                counts["lost"] += not (isinstance(status, int) and 200 <= status < 300)
                if on_progress is not None:
                    on_progress(len(latencies))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"requests": len(bodies), "concurrency": concurrency, "qps": len(bodies) / wall,
            "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95), "p99": np.percentile(ms, 99),
            "statuses": statuses, **counts}


class Workload:
    """Random requests for known users (the store's) and catalog items (from their histories)."""

    def __init__(self, url: str, candidates: int) -> None:
        from genrec.serve.client import connect

        with connect(url, timeout_s=120) as http:
            def get(path: str, **params):
                return http.get(path, params=params).raise_for_status().json()

            self.info = get("/v1/model")
            self.users = get("/v1/users", limit=1000)
            self.items = sorted({e["item_id"] for u in self.users[:200]
                                 for e in get(f"/v1/users/{u}/history", limit=100)["events"]})
        self.candidates = min(candidates, len(self.items))
        self.rng = random.Random(0)

    def bodies(self, path: str, n: int) -> list[dict]:
        if path == "/v1/rank":
            return [{"user_id": self.rng.choice(self.users), "candidates": self.rng.sample(self.items, self.candidates)}
                    for _ in range(n)]
        return [{"user_id": self.rng.choice(self.users), "k": 10} for _ in range(n)]

    def load(self, url: str, path: str, n: int, concurrency: int, on_progress=None) -> dict:
        return asyncio.run(run_load(url, path, self.bodies(path, n), concurrency, on_progress))


def replica_counts() -> dict[str, int]:
    """Running replicas of each deployment of the genrec app (serve.status())."""
    from ray import serve

    app = serve.status().applications.get("genrec")
    return {name: (app.deployments[name].replica_states.get("RUNNING", 0) if app and name in app.deployments else 0)
            for name in DEPLOYMENTS}


def wait_for_replicas(want: int, timeout_s: float) -> float:
    """Seconds until every deployment runs exactly `want` replicas (RuntimeError after timeout_s)."""
    start = time.time()
    while (counts := replica_counts()) != {name: want for name in DEPLOYMENTS}:
        if time.time() - start > timeout_s:
            raise RuntimeError(f"expected {want} running replica(s) of each deployment, have {counts}")
        time.sleep(0.5)
    return time.time() - start



def with_deployments(tree: dict, **options) -> dict:
    """The Serve config tree with every deployment's replica options replaced by `options`."""
    tree = json.loads(json.dumps(tree))
    for d in tree["applications"][0]["deployments"]:
        d.pop("num_replicas", None)
        d.pop("autoscaling_config", None)
        d.update(options)
    return tree


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def latency_cells(r: dict) -> list:
    return [r["requests"], r["concurrency"], f"{r['qps']:.1f}", f"{r['p50']:.1f}", f"{r['p95']:.1f}",
            f"{r['p99']:.1f}"]


def report_lost(what: str, r: dict) -> int:
    """Print the answers of a load that lost requests -> how many it lost."""
    if r["lost"]:
        print(f"{r['lost']} lost ({what}): answers {r['statuses']}", flush=True)
    return r["lost"]


def throughput(url: str, work: Workload, args) -> tuple[str, int]:
    rows, lost = [], 0
    for path in ("/v1/rank", "/v1/recommend"):
        work.load(url, path, 64, 8)  # caches and lazy imports, not measured
        base = work.load(url, path, max(1, args.requests // 10), 1)
        load = work.load(url, path, args.requests, args.concurrency)
        rows.append([f"`{path}` one at a time", *latency_cells(base), "1.0x (baseline)", base["lost"]])
        rows.append([f"`{path}`", *latency_cells(load), f"{load['qps'] / base['qps']:.1f}x", load["lost"]])
        lost += report_lost(f"{path} one at a time", base) + report_lost(path, load)
    header = ["endpoint", "requests", "concurrency", "QPS", "p50 ms", "p95 ms", "p99 ms", "vs baseline", "lost"]
    return table(header, rows), lost


def kills(tree: dict, work: Workload, args) -> tuple[str, int]:
    """For 1 and 2 replicas of each deployment: a /v1/recommend load with no kill, then one per deployment."""
    from genrec.serve.deploy import replica_processes, start

    rows, lost = [], 0
    for replicas in (1, 2):
        url = start(with_deployments(tree, num_replicas=replicas), port=args.port)
        wait_for_replicas(replicas, timeout_s=300)
        work.load(url, "/v1/recommend", 64, 8)
        for victim in (None, *DEPLOYMENTS):
            killed_at = []

            def kill_at_a_third(done: int) -> None:
                if victim and not killed_at and done >= args.requests // 3:
                    os.kill(replica_processes(victim)[0].pid, signal.SIGKILL)
                    killed_at.append(time.time())

            r = work.load(url, "/v1/recommend", args.requests, args.concurrency, kill_at_a_third)
            wait_for_replicas(replicas, timeout_s=300)
            replaced = f"{time.time() - killed_at[0]:.0f} s" if victim else "-"
            rows.append([replicas, victim or "none", *latency_cells(r), r["lost"], r["resent"], r["model_resent"],
                         replaced])
            lost += report_lost(f"{replicas} replica(s), {victim} killed", r)
    header = ["replicas of each", "replica killed", "requests", "concurrency", "QPS", "p50 ms", "p95 ms",
              "p99 ms", "lost", "resent by the client", "model calls resent", "replaced (after the kill)"]
    return table(header, rows), lost


class ReplicaTimeline:
    """serve.status()'s running replicas of each deployment, sampled every `every_s` in a thread."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.samples, self.every_s, self.stop = [], every_s, threading.Event()
        self.start = time.time()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time() - self.start, replica_counts()))
            self.stop.wait(self.every_s)

    def changes(self) -> list[tuple[float, dict]]:
        """The samples where a count changed (and the first)."""
        return [s for i, s in enumerate(self.samples) if i == 0 or s[1] != self.samples[i - 1][1]]


def autoscaling(tree: dict, work: Workload, args) -> tuple[str, int, bool]:
    """Every deployment from 1 replica: low load, high load until scaled up, high load again, idle until back at 1."""
    from genrec.serve.deploy import start

    policy = {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target,
              "upscale_delay_s": 2, "downscale_delay_s": 10, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    url = start(with_deployments(tree, autoscaling_config=policy), port=args.port)
    wait_for_replicas(1, timeout_s=300)
    work.load(url, "/v1/recommend", 64, 1)
    timeline, phases, lost = ReplicaTimeline(), [], 0

    def phase(name: str, n: int, concurrency: int) -> None:
        nonlocal lost
        began = time.time() - timeline.start
        r = work.load(url, "/v1/recommend", n, concurrency)
        during = f"{began:.0f}-{time.time() - timeline.start:.0f} s"
        phases.append([name, during, *latency_cells(r), r["lost"], " / ".join(map(str, replica_counts().values()))])
        lost += report_lost(name, r)

    def scaled_up() -> bool:
        return any(c > 1 for c in replica_counts().values())

    phase("low load, 1 replica each", max(1, args.requests // 10), 1)
    deadline = time.time() + args.scale_timeout_s
    while time.time() < deadline and not scaled_up():
        phase("high load, scaling up", args.requests, args.concurrency)
    if scaled_up():
        phase("high load, scaled up", args.requests, args.concurrency)
        phase("low load, scaled up", max(1, args.requests // 10), 1)
    load_end = time.time() - timeline.start
    try:
        wait_for_replicas(1, timeout_s=args.scale_timeout_s)
        back_down = True
    except RuntimeError:
        back_down = False
    timeline.stop.set()
    timeline.thread.join()
    timeline.samples.append((time.time() - timeline.start, replica_counts()))
    first_up = next((f"{t:.0f} s" for t, counts in timeline.samples if any(c > 1 for c in counts.values())), None)
    header = ["phase", "during", "requests", "concurrency", "QPS", "p50 ms", "p95 ms", "p99 ms", "lost",
              "replicas at its end (Ingress / Retrieval / Ranking)"]
    changes = "; ".join(f"{t:.0f} s: " + " / ".join(map(str, counts.values())) for t, counts in timeline.changes())
    text = (f"autoscaling_config of every deployment: {json.dumps(policy)}\n\n{table(header, phases)}\n\n"
            f"running replicas (Ingress / Retrieval / Ranking) from the first request: {changes}\n"
            f"first scaled up at {first_up or f'NEVER (within {args.scale_timeout_s:.0f} s)'}; the last request at "
            f"{load_end:.0f} s; back to 1 replica of each at "
            f"{f'{timeline.samples[-1][0]:.0f} s' if back_down else 'NEVER (within %.0f s)' % args.scale_timeout_s}")
    return text, lost, first_up is not None and back_down


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "serve" / "demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="as jobs/serve.py: ranker.uri=models:/demo-gr/latest, model.uri=..., ...")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=256)
    parser.add_argument("--max-replicas", type=int, default=3, help="autoscaling: at most this many of each")
    parser.add_argument("--target", type=float, default=4, help="autoscaling: target ongoing requests per replica")
    parser.add_argument("--scale-timeout-s", type=float, default=180)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--skip", default="", help="comma-separated: throughput, kills, autoscaling")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import ray
    from ray import serve

    from genrec.config import RayConfig
    from genrec.reports import machine
    from genrec.runtime import init_ray
    from genrec.serve.deploy import load_serve_file, start

    os.environ.setdefault("GENREC_SERVE_TOKEN", "benchmark-token-not-used-for-writes")
    # its own events file: the history store starts from the prepared data alone (a demo's events are not read)
    events_db = Path(tempfile.mkdtemp(prefix="serve_load-")) / "events.sqlite"
    tree = load_serve_file(args.config, [f"store.events_db={events_db}", *args.overrides])
    init_ray(RayConfig(num_cpus=args.num_cpus))
    url = start(tree, port=args.port)
    work = Workload(url, args.candidates)
    info = work.info
    ranker = f"; ranker {info['ranker']['name']} v{info['ranker']['version']}" if info.get("ranker") else ""
    print(f"model {info['name']} v{info['version']} ({info['kind']}, {info['num_items']} items, N = "
          f"{info['max_seq_len']}){ranker}; {work.candidates} candidates per /v1/rank; {len(work.users)} users")
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.1f}; Ray {ray.__version__}; the app's "
          f"replicas share these CPUs with the client\n", flush=True)
    failed = False
    if "throughput" not in skip:
        text, lost = throughput(url, work, args)
        print(f"Throughput (the config's deployments):\n\n{text}\n", flush=True)
        failed |= bool(lost)
    if "kills" not in skip:
        text, lost = kills(tree, work, args)
        print(f"A replica killed after a third of a /v1/recommend load:\n\n{text}\n", flush=True)
        failed |= bool(lost)
    if "autoscaling" not in skip:
        text, lost, scaled = autoscaling(tree, work, args)
        print(f"Autoscaling (/v1/recommend):\n\n{text}\n", flush=True)
        failed |= bool(lost) or not scaled
    serve.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
