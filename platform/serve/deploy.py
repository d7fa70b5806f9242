"""Deploying the genrec Serve app: its Serve config file (configs/serve/*.yaml, with `--set` overrides),
the application builder Serve calls (import_path genrec.serve.deploy:build_app), and `start`, which
deploys a loaded file on the connected Ray cluster as `serve deploy` does. Started again with only the
model changed (the Ingress's user_config), the model rolls out in place (genrec.serve.rollout).
"""

import json
import time
from pathlib import Path

import psutil
import yaml
from pydantic import ValidationError
from ray import serve

from ..config import ConfigError, ServeConfig, ServeUserConfig, describe_error, parse_override, resolve_path
from ..storage import is_uri
from .app import Ingress
from .model import absolute_location, absolute_tracking_uri
from .replicas import Ranking, Retrieval

DEPLOYMENTS = ("Ingress", "Retrieval", "Ranking")


def serve_settings(args: dict, origin: str = "application args") -> ServeConfig:
    try:
        return ServeConfig.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(describe_error(err, origin)) from None


def build_app(args: dict):
    """Serve's application builder (import_path genrec.serve.deploy:build_app in a Serve config file). The model
    is not an argument: it comes with the Ingress's user_config (genrec.serve.rollout); the deployments'
    options (replicas, autoscaling, user_config, ...) are the config file's, applied by Serve."""
    settings = serve_settings(args).model_dump(mode="json")
    return Ingress.bind(Retrieval.bind(settings), Ranking.bind(settings), settings)


def load_serve_file(path: str | Path, overrides: list[str] = ()) -> dict:
    """A Serve config file with `--set` overrides: `model.uri=...` sets the model (the Ingress deployment's
    user_config; `ranker.uri=...` the ranking model beside it), `batching.max_batch_size=8` the genrec app's args, `deployments.Ranking.num_replicas=2` a
    deployment option, `http_options.port=8001` Serve's own."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"serve config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    apps = tree.get("applications")
    if not isinstance(apps, list) or len(apps) != 1:
        raise ConfigError(f"{path}: applications must list exactly one application (the genrec app)")
    app = apps[0]
    for text in overrides:
        key, value = parse_override(text)
        head, _, rest = key.partition(".")
        if head == "deployments" and rest.count(".") >= 1:
            name, _, option = rest.partition(".")
            _set(_deployment(app, name), option.split("."), value)
        elif head == "http_options" and rest:
            tree.setdefault("http_options", {})[rest] = value
        elif head in ("model", "ranker"):
            _set(_deployment(app, "Ingress"), ["user_config", *key.split(".")], value)
        else:
            _set(app, ["args", *key.split(".")], value)
    for d in app.get("deployments") or []:
        if d.get("name") not in DEPLOYMENTS:
            raise ConfigError(f"{path} applications[0].deployments: unknown deployment {d.get('name')!r}; "
                              f"expected one of {list(DEPLOYMENTS)}")
    serve_settings(app.get("args"), f"{path} applications[0].args")
    try:
        ServeUserConfig.model_validate(_deployment(app, "Ingress").get("user_config") or {})
    except ValidationError as err:
        raise ConfigError(describe_error(err, f"{path} applications[0].deployments.Ingress.user_config "
                                         "(the model served)")) from None
    return tree


def _deployment(app: dict, name: str) -> dict:
    entries = app.setdefault("deployments", [])
    entry = next((d for d in entries if d.get("name") == name), None)
    if entry is None:
        entries.append(entry := {"name": name})
    return entry


def _set(node: dict, keys: list[str], value) -> None:
    *parents, leaf = keys
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value


def pin_paths(tree: dict) -> dict:
    """The tree with the local paths it names made absolute, as the calling process means them: Serve builds
    the app and runs its replicas in other processes (another working directory, maybe another node).
    Object-store URIs stay as they are."""
    tree = json.loads(json.dumps(tree))
    app = tree["applications"][0]
    store = app.setdefault("args", {}).setdefault("store", {})
    store["root"] = str(resolve_path(store.get("root") or "."))
    if store.get("events_db"):
        store["events_db"] = str(resolve_path(store["events_db"]))
    if store.get("sequences"):
        store["sequences"] = absolute_location(store["sequences"])
    store.setdefault("events_db", str(resolve_path(ServeConfig().store.events_db)))
    user_config = _deployment(app, "Ingress").setdefault("user_config", {})
    user_config.setdefault("model", {})
    for model in (user_config[key] for key in ("model", "ranker") if user_config.get(key)):
        model["tracking_uri"] = absolute_tracking_uri(model.get("tracking_uri"))
        # a local model folder is pinned; models:/, runs:/ and object-store URIs (s3://...) are left as they are
        if model.get("uri") and not is_uri(model["uri"]) and resolve_path(model["uri"]).is_dir():
            model["uri"] = str(resolve_path(model["uri"]))
    return tree


def start(tree: dict, port: int | None = None, timeout_s: float = 600) -> str:
    """Deploy a loaded Serve config file on the connected Ray cluster, as `serve deploy` does -> the base URL.
    Binds http_options.host, 127.0.0.1 unless the file says otherwise; waits until the app runs. Called
    again with the same args and another model (the Ingress's user_config), it rolls the model out in place
    (genrec.serve.rollout) and returns once the ingress has switched or reported the failure."""
    # Private, on purpose (Ray 2.60): a user_config-only change must reconfigure the running replicas, not
    # replace them, and only a config deploy does that (its code version is a hash of the import path and
    # runtime_env: deploy_utils.get_app_code_version). The public Python API cannot: serve.run deploys a built
    # app under a random code version each call (client.deploy_applications: `deployment._version or
    # get_random_string()`; .options(version=) is removed), so every call replaces every replica. The public
    # equivalents of these two calls are `serve deploy` / the REST API (PUT /api/serve/applications/), which
    # need the dashboard that tests and jobs/serve.py run without; `serve run config.yaml` itself makes exactly
    # these two calls (serve/scripts.py), and the dashboard's REST handler the second.
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    tree = pin_paths(tree)
    http = tree.setdefault("http_options", {})
    http.setdefault("host", "127.0.0.1")
    if port is not None:
        http["port"] = port
    http.setdefault("port", 8000)
    config = ServeDeploySchema.model_validate(tree)
    name = config.applications[0].name
    client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
    client.deploy_apps(config)  # the controller marks the app DEPLOYING before this returns
    deadline = time.time() + timeout_s
    while True:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING":
            break
        if app is not None and app.status == "DEPLOY_FAILED" or time.time() > deadline:
            raise RuntimeError(f"the Serve app {name!r} did not start: "
                               f"{app.status if app else 'not deployed'} {app.message if app else ''}")
        time.sleep(0.5)
    return f"http://{http['host']}:{http['port']}"


def replica_processes(deployment: str) -> list[psutil.Process]:
    """The live replica processes of a deployment of the genrec app under this process's local Ray cluster
    (Ray names them in the process title): what a fault test or benchmark kills."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if f"ServeReplica:genrec:{deployment}" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:  # gone while we looked
            continue
    return found
