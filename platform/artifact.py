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
    model, cfg = load_model("models:/ml-1m-hstu/1", uri)   # or anything MLflow can download

model.kind hstu / sasrec build a retrieval encoder; gr / dlrm (RANKERS) a ranker over the
interleaved layout (genrec.model.generative, genrec.model.dlrm).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ExperimentConfig, resolve_path
from .data.layout import TOKEN_TYPES
from .data.prepared import MANIFEST, VOCAB, read_manifest
from .model import EncoderConfig, SequentialEncoder, build_encoder
from .model.dlrm import DLRMRanker
from .model.generative import GenerativeConfig, GenerativeRecommender, TokenTypes

WEIGHTS = "model.pt"
CONFIG = "config.json"
RANKERS = ("gr", "dlrm")

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
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    data = resolve_path(cfg.data.output_dir)
    shutil.copytree(data / VOCAB, folder / VOCAB, dirs_exist_ok=True)
    shutil.copy(data / MANIFEST, folder / MANIFEST)
    return folder


def load_model_folder(folder: str | Path) -> tuple[Model, ExperimentConfig]:
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG, MANIFEST):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a genrec model folder: no {name}")
    cfg = ExperimentConfig.model_validate_json((folder / CONFIG).read_text())
    model = build_model(cfg, json.loads((folder / MANIFEST).read_text()))
    model.load_state_dict(torch.load(folder / WEIGHTS, weights_only=True))
    return model.eval(), cfg


def load_model(uri: str | Path, tracking_uri: str | None = None) -> tuple[Model, ExperimentConfig]:
    """A model folder, or an MLflow URI of one (`models:/name/version`, `runs:/id/model_files`, ...)
    -> (model in eval mode, the config it was trained with)."""
    if Path(uri).is_dir():
        return load_model_folder(uri)
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return load_model_folder(mlflow.artifacts.download_artifacts(artifact_uri=str(uri), dst_path=tmp))
