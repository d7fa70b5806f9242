"""Recipe: serve a trained model over HTTP with Ray Serve (retrieval, ranking, recommend, events).

    python jobs/serve.py --config configs/serve/demo.yaml [--set model.uri=models:/demo-hstu/2]

Starts the app of the Serve config file on a local Ray cluster (or RAY_ADDRESS),
prints the URLs and stays up until Ctrl-C, then shuts Serve down cleanly.
`--set` keys: the app's args (model.uri=..., auth.token_env=...), a deployment's
option (deployments.Ranking.num_replicas=2), or Serve's (http_options.port=8001).
"""

import signal
import threading

from ray import serve

from genrec.config import RayConfig
from genrec.runtime import init_ray, run_job
from genrec.serve.app import load_serve_file, start


def main(args) -> int:
    tree = load_serve_file(args.config, args.overrides)
    init_ray(RayConfig(num_cpus=args.num_cpus))
    url = start(tree)
    print(f"genrec is serving at {url}/  (API docs {url}/docs, health {url}/healthz)", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print("shutting down", flush=True)
    serve.shutdown()
    return 0


def arguments(parser) -> None:
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")


if __name__ == "__main__":
    run_job(main, __doc__.splitlines()[0], extra=arguments)
