"""The model artifact: config -> model -> one folder that training writes, MLflow registers,
and evaluation and serving load. Its own module, beside config.py, so that serving rebuilds
a model without importing any training code.

    model/
      model.pt        state dict (loaded with weights_only=True)
      config.json     the experiment config that built it (its `model` section shapes the model,
                      its `ranking.tasks` a ranker's heads)
      manifest.json   the prepared data's manifest (item count, vocabularies, actions)
      vocab/          raw id <-> dense index tables

    model, cfg = load_model("outputs/.../model")          # a folder
    model, cfg = load_model("s3://bucket/genrec/model")    # a folder in object storage (genrec.storage)
    model, cfg = load_model("models:/ml-1m-hstu/1", uri)   # or anything MLflow can download

model.kind hstu / sasrec build a retrieval encoder; gr / dlrm (RANKERS) a ranker over the
interleaved layout (genrec.model.generative, genrec.model.dlrm).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from pyarrow.fs import FileType

from .config import ExperimentConfig
from .data.layout import TOKEN_TYPES
from .data.prepared import KEY as DATA_KEY
from .data.prepared import MANIFEST, VOCAB, data_location, read_manifest
from .model import EncoderConfig, SequentialEncoder, build_encoder
from .model.dlrm import DLRMRanker
from .model.generative import GenerativeConfig, GenerativeRecommender, TokenTypes
from .storage import Location, StorageError, download, is_uri, location, storage_error

WEIGHTS = "model.pt"
CONFIG = "config.json"
RANKERS = ("gr", "dlrm")
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")  # what MLflow resolves (its registry, its runs)

Model = SequentialEncoder | GenerativeRecommender | DLRMRanker


def is_ranking(cfg: ExperimentConfig) -> bool:
    """A ranker (interleaved batches, per-task heads) rather than a retrieval encoder."""
    return cfg.model.kind in RANKERS


def encoder_config(cfg: ExperimentConfig, num_items: int) -> EncoderConfig:
    """The torch-side description of the encoder an experiment config asks for."""
    m = cfg.model
    return EncoderConfig(kind=m.kind, num_items=num_items, num_positions=m.max_seq_len, dim=m.dim,
                         num_blocks=m.num_blocks, num_heads=m.num_heads, qk_dim=m.qk_dim, v_dim=m.v_dim,
                         ffn_dim=m.ffn_dim, dropout=m.dropout, attention_normalizer=m.attention_normalizer,
                         attention_impl=m.attention_impl, attention=m.attention,
                         relative_bias=m.relative_bias)


def generative_config(cfg: ExperimentConfig, manifest: dict) -> GenerativeConfig:
    """The torch-side shape: the HSTU stack sized in tokens (context + 2 per kept item + the candidate)."""
    contexts = manifest.get("context_features") or {}
    max_tokens = len(contexts) + 2 * cfg.model.max_seq_len + 1
    encoder = dataclasses.replace(encoder_config(cfg, manifest["num_items"]), kind="hstu", num_positions=max_tokens)
    return GenerativeConfig(encoder, num_actions=len(manifest["actions"]),
                            multi_hot_actions=manifest.get("action_encoding") == "bitmask",
                            num_context=sum(size + 1 for size in contexts.values()),
                            tasks=tuple((t.name, t.kind) for t in cfg.ranking.tasks),
                            token_types=TokenTypes(*TOKEN_TYPES))


def build_ranker(cfg: ExperimentConfig, manifest: dict) -> GenerativeRecommender | DLRMRanker:
    config = generative_config(cfg, manifest)
    return GenerativeRecommender(config) if cfg.model.kind == "gr" else DLRMRanker(config)


def build_model(cfg: ExperimentConfig, manifest: dict | None = None) -> Model:
    """A fresh encoder (or, for model.kind gr / dlrm, ranker) for the experiment's prepared data
    (its manifest, read from data.output_dir unless given)."""
    manifest = manifest if manifest is not None else read_manifest(cfg.data.output_dir)
    if is_ranking(cfg):
        return build_ranker(cfg, manifest)
    return build_encoder(encoder_config(cfg, manifest["num_items"]))


def save_model_folder(folder: Path, cfg: ExperimentConfig, state_dict: dict) -> Path:
    """A local model folder; the vocabularies and manifest come from the prepared data, wherever it is
    (data.output_dir: a local path, a shared mount or an object-store URI)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    prepared = location(cfg.data.output_dir, DATA_KEY)
    download(data_location(prepared) / VOCAB, folder / VOCAB)
    (folder / MANIFEST).write_bytes((prepared / MANIFEST).read_bytes())
    return folder


def load_model_folder(folder: str | Path) -> tuple[Model, ExperimentConfig]:
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG, MANIFEST):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a genrec model folder: no {name}")
    cfg = ExperimentConfig.model_validate_json((folder / CONFIG).read_text())
    model = build_model(cfg, json.loads((folder / MANIFEST).read_text()))
    # the weights memory-mapped and assigned, not copied into the model's own freshly built tables: at a
    # 4M-item catalog the copy held a second 1 GiB table while a serving replica loaded. Only torch.save's
    # zip format maps; anything else is read as before, so a damaged file fails with the unpickler's error
    weights = folder / WEIGHTS
    state = torch.load(weights, weights_only=True, mmap=zipfile.is_zipfile(weights))
    model.load_state_dict(state, assign=True)
    return model.eval(), cfg


def is_stored_folder(uri: str | Path) -> bool:
    """A folder URI that genrec.storage reads (s3://..., gs://..., file://...), not one MLflow resolves."""
    return is_uri(uri) and not str(uri).startswith(MLFLOW_SCHEMES)


@contextmanager
def model_folder(uri: str | Path, tracking_uri: str | None = None, key: str = "model.uri") -> Iterator[Path]:
    """A local folder holding the model at `uri` while the block runs: a local folder as it is; a folder in
    object storage (s3://bucket/prefix/model) or an MLflow URI (models:/name/version, runs:/id/model_files)
    downloaded to a temporary folder, removed afterwards. `key` names the setting in errors."""
    if is_stored_folder(uri):
        source = stored_model(str(uri), key)
        with tempfile.TemporaryDirectory(prefix="genrec-model-") as tmp:
            try:
                folder = download(source, Path(tmp))
            except OSError as err:
                raise storage_error(err, key, source) from None
            yield folder
    elif Path(uri).is_dir():
        yield Path(uri)
    else:
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        with tempfile.TemporaryDirectory(prefix="genrec-model-") as tmp:
            yield Path(mlflow.artifacts.download_artifacts(artifact_uri=str(uri), dst_path=tmp))


def stored_model(uri: str, key: str = "model.uri") -> Location:
    """A model folder in object storage, checked to hold a model: a missing bucket or folder, refused
    credentials, ... are one line that names the key."""
    source = location(uri, key)
    try:
        if (source / WEIGHTS).is_file():
            return source
        bucket = location("/".join(source.uri.split("/")[:3]), key)  # scheme://bucket
        missing = f"the bucket {bucket.name!r} does not exist" if bucket.info().type == FileType.NotFound else \
            f"no {WEIGHTS} there"
    except OSError as err:
        raise storage_error(err, key, source) from None
    raise StorageError(f"{key}={source.uri}: not a genrec model folder ({missing})")


def load_model(uri: str | Path, tracking_uri: str | None = None,
               key: str = "model.uri") -> tuple[Model, ExperimentConfig]:
    """A model folder (local or in object storage), or an MLflow URI of one (`models:/name/version`,
    `runs:/id/model_files`, ...) -> (model in eval mode, the config it was trained with)."""
    with model_folder(uri, tracking_uri, key) as folder:
        return load_model_folder(folder)
