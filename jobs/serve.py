"""Recipe: serve a trained model over HTTP with Ray Serve (retrieval, ranking, recommend, events).

    python jobs/serve.py --config configs/serve/demo.yaml [--set model.uri=models:/demo-hstu/2]
    python jobs/serve.py --config configs/serve/demo.yaml --set model.uri=s3://bucket/genrec/models/demo-hstu
    kill -HUP <its pid>        # re-read the file (same --set) and apply it: a new model rolls out in place

Starts the app of the Serve config file on a local Ray cluster (or RAY_ADDRESS),
prints the URLs and stays up until Ctrl-C, then shuts Serve down cleanly.
The model is a registry URI (its artifacts wherever the MLflow server keeps them, e.g. s3) or a model
folder: a local path, or an object-store URI that every replica downloads with the AWS chain's
credentials (AWS_ENDPOINT_URL for an S3-compatible store).
`--set` keys: the model (model.uri=..., model.watch_s=30), the app's args
(auth.token_env=..., retrieval.index=hnsw), a deployment's option
(deployments.Ranking.num_replicas=2), or Serve's (http_options.port=8001).
On SIGHUP the file is applied again as `serve deploy` would: when only the model
changed, the running replicas load it and switch with no failed request; a model
that does not load leaves the old one serving (GET /v1/model says why).
"""

import os
import signal
import threading

from genrec.config import RayConfig
from genrec.runtime import init_ray, run_job, stop_serving_and_ray
from genrec.serve.deploy import load_serve_file, start


def main(args) -> int:
    tree = load_serve_file(args.config, args.overrides)
    init_ray(RayConfig(num_cpus=args.num_cpus))
    # before the app starts: a Ctrl-C while it starts also ends in the clean shutdown below
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: (reload.set(), stop.set()))
    url = start(tree)
    print(f"genrec is serving at {url}/  (API docs {url}/docs, health {url}/healthz); "
          f"kill -HUP {os.getpid()} re-applies {args.config}", flush=True)
    while True:
        stop.wait()
        if not reload.is_set():
            break
        stop.clear()
        reload.clear()
        try:  # a broken file is reported and changes nothing
            start(load_serve_file(args.config, args.overrides))
            print(f"applied {args.config}; GET {url}/v1/model shows the rollout", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"not applied: {err}", flush=True)
    print("shutting down", flush=True)
    stop_serving_and_ray()
    return 0


def arguments(parser) -> None:
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0], extra=arguments)
