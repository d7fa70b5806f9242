"""The model artifact: one folder that training writes, MLflow registers, and
evaluation and serving load.

    model/
      model.pt        state dict (loaded with weights_only=True)
      config.json     the experiment config that built it (its `model` section shapes the encoder)
      manifest.json   the prepared data's manifest (item count, vocabularies, actions)
      vocab/          raw id <-> dense index tables

    encoder, cfg = load_model("outputs/.../model")          # a folder
    encoder, cfg = load_model("models:/ml-1m-hstu/1", uri)   # or anything MLflow can download
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import ExperimentConfig, resolve_path
from ..data.prepared import MANIFEST, VOCAB, read_manifest
from ..model import EncoderConfig, SequentialEncoder, build_encoder

WEIGHTS = "model.pt"
CONFIG = "config.json"


def encoder_config(cfg: ExperimentConfig, num_items: int) -> EncoderConfig:
    """The torch-side description of the encoder an experiment config asks for."""
    m = cfg.model
    return EncoderConfig(kind=m.kind, num_items=num_items, max_seq_len=m.max_seq_len, dim=m.dim,
                         num_blocks=m.num_blocks, num_heads=m.num_heads, qk_dim=m.qk_dim, v_dim=m.v_dim,
                         ffn_dim=m.ffn_dim, dropout=m.dropout, attention_normalizer=m.attention_normalizer,
                         attention_impl=m.attention_impl, attention=m.attention,
                         relative_bias=m.relative_bias)


def build_model(cfg: ExperimentConfig) -> SequentialEncoder:
    """A fresh encoder (or, for model.kind gr / dlrm, ranker) for the experiment's prepared data."""
    return _build(cfg, read_manifest(cfg.data.output_dir))


def _build(cfg: ExperimentConfig, manifest: dict):
    if cfg.model.kind in ("gr", "dlrm"):
        from .ranking import build_ranker  # ranking imports this module

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


def load_model_folder(folder: str | Path) -> tuple[SequentialEncoder, ExperimentConfig]:
    folder = Path(folder)
    for name in (WEIGHTS, CONFIG, MANIFEST):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a genrec model folder: no {name}")
    cfg = ExperimentConfig.model_validate_json((folder / CONFIG).read_text())
    encoder = _build(cfg, json.loads((folder / MANIFEST).read_text()))
    encoder.load_state_dict(torch.load(folder / WEIGHTS, weights_only=True))
    return encoder.eval(), cfg


def load_model(uri: str | Path, tracking_uri: str | None = None) -> tuple[SequentialEncoder, ExperimentConfig]:
    """A model folder, or an MLflow URI of one (`models:/name/version`, `runs:/id/model_files`, ...)
    -> (encoder in eval mode, the config it was trained with)."""
    if Path(uri).is_dir():
        return load_model_folder(uri)
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return load_model_folder(mlflow.artifacts.download_artifacts(artifact_uri=str(uri), dst_path=tmp))
