"""One configuration system: typed pydantic models, loaded from YAML, with `--set` overrides.

    cfg = load_config("configs/ml-1m/hstu.yaml", ["train.epochs=10"])

Every model forbids unknown keys, so a typo is an error that names the key
(`train.epochz: unknown key`), and a wrong type names the key and the value.
Relative paths are resolved against $GENREC_ROOT when it is set (so a job sent
with `ray job submit --working-dir .` still finds data that lives beside the
repo), else against the current directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import GenrecError
from .storage import is_uri, resolve_path  # noqa: F401 (re-exported: the config's own path rules)


class ConfigError(GenrecError, ValueError):
    """A bad config file, key or value; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------- sources

class ColumnMapping(Strict):
    """Which source column holds each canonical field (generic CSV / Parquet logs)."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    action: str | None = None
    value: str | None = None
    id_type: Literal["int", "string"] = Field("int", description="raw user/item ids: integers or strings")


class ActionsConfig(Strict):
    """The action vocabulary and how raw action values map onto it.

    `names` is the vocabulary in id order. `mapping` maps raw values found in the
    source (e.g. "pv") to a name; raw values that are names already need no entry.
    With `prefix`, a raw value v also stands for the name prefix + v, so numeric codes
    or ratings need no mapping (prefix "rating_": 4 -> rating_4).
    A raw value that maps to nothing is rejected ("unknown action").
    With `merge_same_impression`, several actions on the same (user, item, timestamp)
    become one event whose action is the bitmask OR(1 << id).
    """

    names: list[str] = Field(default_factory=lambda: ["interact"], min_length=1, max_length=31)
    mapping: dict[str, str] = Field(default_factory=dict)
    prefix: str | None = Field(None, min_length=1, description="a raw value v is the action named prefix + v "
                               "(e.g. rating_: a rating 4 is action rating_4); names without it keep their own")
    merge_same_impression: bool = False

    @model_validator(mode="after")
    def _mapping_targets_exist(self):
        unknown = sorted(set(self.mapping.values()) - set(self.names))
        if unknown:
            raise ValueError(f"mapping targets {unknown} are not in names {self.names}")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate action names in {self.names}")
        return self


TimestampUnit = Literal["s", "ms", "iso"]  # iso: ISO-8601 text (Parquet timestamp columns need none)


class MovieLensSource(Strict):
    """MovieLens-1M style `::` files: ratings.dat, users.dat, movies.dat (latin-1)."""

    kind: Literal["movielens"]
    path: str = Field(description="folder holding movies.dat, users.dat and the ratings file")
    ratings_file: str = "ratings.dat"
    movies_file: str = "movies.dat"
    users_file: str | None = "users.dat"


class MovieLensCsvSource(Strict):
    """MovieLens-20M/25M style ratings.csv (userId,movieId,rating,timestamp) + movies.csv."""

    kind: Literal["movielens_csv"]
    path: str
    ratings_file: str = "ratings.csv"
    movies_file: str | None = "movies.csv"


class UsersFile(Strict):
    """A delimited text file of user context: one row per user, a user id column and feature columns."""

    path: str
    delimiter: str | None = Field(None, min_length=1, max_length=1, description="default: the event log's")
    header: bool = Field(True, description="false: name the columns with column_names")
    column_names: list[str] | None = Field(None, description="names of a headerless file's columns, in order")
    user_id: str = Field("user_id", description="the column holding the user id (as in the event log)")
    features: list[str] | None = Field(None, description="columns kept as user context; default every other")

    @model_validator(mode="before")
    @classmethod
    def _a_path_alone(cls, value):
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _names_only_without_header(self):
        if self.column_names is not None and self.header:
            raise ValueError("column_names is for headerless files; set header: false")
        return self


TEXT_SUFFIXES = (".csv", ".tsv", ".txt", ".dat")  # the files of a folder a csv source reads by default


class CsvSource(Strict):
    """A delimited text event log (one event per line), plain, .gz or .zst, with a column mapping."""

    kind: Literal["csv"]
    path: str = Field(description="a file (read whatever its name), a folder of them, or an object-store URI of "
                      "either or of a key prefix (s3://bucket/logs/2026-12-)")
    file_pattern: str | None = Field(None, description=f"in a folder: the file names read (a glob, e.g. 'u*.data'); "
                                     f"default {', '.join('*' + s for s in TEXT_SUFFIXES)}, each also .gz or .zst")
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    delimiter: str = Field(",", min_length=1, max_length=1)
    header: bool = Field(True, description="false: no header line; name columns with column_names, "
                         "else they are named by position \"0\", \"1\", ...")
    column_names: list[str] | None = Field(None, description="names of a headerless file's columns, in order")
    timestamp_unit: TimestampUnit = "s"
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    item_features: list[str] = Field(default_factory=list, description="extra columns kept as item features "
                                     "(the value on the item's first event in source order)")
    users_file: UsersFile | None = Field(None, description="optional user context: a path (a file with a header "
                                         "line and a user_id column), or {path, delimiter, header, column_names, "
                                         "user_id, features}")

    @model_validator(mode="after")
    def _names_only_without_header(self):
        if self.column_names is not None and self.header:
            raise ValueError("column_names is for headerless files; set header: false")
        return self


class ParquetSource(Strict):
    """A Parquet event log (file or folder) with a column mapping."""

    kind: Literal["parquet"]
    path: str = Field(description="a file (read whatever its name), a folder of them, or an object-store URI of "
                      "either or of a key prefix (s3://bucket/logs/2026-12-)")
    file_pattern: str | None = Field(None, description="in a folder: the file names read (a glob); default *.parquet")
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    timestamp_unit: TimestampUnit = "s"
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    users_file: str | None = Field(None, description="optional Parquet of user context (user_id + features)")
    item_features: list[str] = Field(default_factory=list, description="extra columns kept as item features "
                                     "(the value on the item's first event in source order)")


RAY_DATA_READERS = "read_json, read_csv, read_parquet, read_sql, read_delta, read_iceberg, read_bigquery, ..."


class RayDataSource(Strict):
    """Events from any Ray Data reader, or from a ray.data.Dataset given to prepare(cfg, dataset=ds), with a
    column mapping: validated by the same rules as a CSV or Parquet log (see genrec.data.ray_source)."""

    kind: Literal["ray_data"]
    reader: str | None = Field(None, description=f"the ray.data function that reads the events ({RAY_DATA_READERS}); "
                               "omit it when prepare is given a Dataset")
    args: dict[str, Any] = Field(default_factory=dict, description="the reader's keyword arguments (e.g. paths: a "
                                 "file, folder or object-store URI, read by Ray Data's own filesystem handling)")
    columns: ColumnMapping = Field(default_factory=ColumnMapping)
    timestamp_unit: TimestampUnit = "s"
    actions: ActionsConfig = Field(default_factory=ActionsConfig)
    item_features: list[str] = Field(default_factory=list, description="extra columns kept as item features "
                                     "(the value on the item's first event in source order)")

    @field_validator("reader")
    @classmethod
    def _a_ray_data_reader(cls, name: str | None) -> str | None:
        if name is not None:
            import ray.data  # only for this kind of source: importing Ray Data takes a second

            if not (name.startswith("read_") and callable(getattr(ray.data, name, None))):
                raise ValueError(f"not a ray.data.read_* function ({RAY_DATA_READERS})")
        return name


class SyntheticSource(Strict):
    """Generated events from a latent world with a known optimum (see genrec.data.synthetic).

    Items have topics, latent vectors and Zipf popularity; users have drifting topic
    interests and sessions in which the next topic follows the previous item's topic
    (a topic-level Markov process); items enter and fade over time; actions depend on
    user-item affinity and position in session. The generator computes the oracle.
    """

    kind: Literal["synthetic"]
    num_users: int = Field(20_000, gt=0)
    num_items: int = Field(5_000, gt=1)
    mean_events_per_user: float = Field(50.0, gt=1)
    min_events_per_user: int = Field(5, ge=1)
    max_events_per_user: int = Field(2_000, ge=1, description="also capped at half the catalog (no repeats)")
    zipf_exponent: float = Field(1.05, gt=0, description="item popularity weight 1 / rank^s")
    num_topics: int = Field(32, gt=0)
    latent_dim: int = Field(16, gt=0, description="item/user latent vectors (action affinity)")
    interest_concentration: float = Field(
        0.1, gt=0, description="Dirichlet parameter per topic of a user's interests; small = focused users")
    interest_drift: float = Field(0.1, ge=0, le=1, description="per session: interests move this far to a fresh draw")
    topic_transition: float = Field(
        0.5, ge=0, le=1, description="within a session, weight of the previous item's topic transition vs interests")
    transition_concentration: float = Field(0.1, gt=0, description="Dirichlet parameter of topic transition rows")
    exploration: float = Field(0.05, ge=0, le=1, description="share of next topics drawn from global topic popularity")
    session_end_prob: float = Field(0.15, gt=0, le=1, description="chance a session ends after each event")
    duration_days: float = Field(365.0, gt=0, description="users start uniformly over this span; items enter over it")
    period_days: float = Field(7.0, gt=0, description="granularity of the vocabulary clock")
    new_item_fraction: float = Field(0.0, ge=0, lt=1, description="share of the catalog that enters after the start")
    item_half_life_days: float | None = Field(None, gt=0, description="item popularity halves every this many days")
    action_rates: dict[str, float] = Field(
        default_factory=lambda: {"click": 0.72, "like": 0.12, "add_to_cart": 0.08, "share": 0.03, "purchase": 0.05},
        min_length=1,
        description="weakest action first; base rates of an impression's (first) action",
    )
    action_affinity: float = Field(3.0, ge=0, description="how strongly actions respond to user-item affinity")
    taste_noise: float = Field(
        0.6, ge=0, description="size of each user's private taste vector beside their interests: the part of "
        "action affinity that only the user's past actions reveal (0: taste = interests)")
    action_session_slope: float = Field(0.3, description="how strongly strong actions grow with position in session")
    multi_action_rate: float = Field(0.05, ge=0, le=1, description="chance an impression gets a second action")
    oracle_max_users: int = Field(20_000, gt=0, description="oracle metrics on at most this many users (every k-th)")
    block_users: int = Field(
        1024, gt=0, description="users simulated together on one RNG stream (fewer for large catalogs): the unit "
        "of determinism, so changing it changes the data and num_shards does not")
    start_time: int = 1_577_836_800  # 2020-01-01
    seed: int = 0
    num_shards: int = Field(8, gt=0)
    path: str | None = Field(None, description="where the generated events go; default outputs/raw/synthetic-<hash>")


Source = Annotated[
    Union[MovieLensSource, MovieLensCsvSource, CsvSource, ParquetSource, RayDataSource, SyntheticSource],
    Field(discriminator="kind"),
]


class LeaveOneOutSplit(Strict):
    """valid target = second-to-last item, test target = last, train = the rest."""

    kind: Literal["leave_one_out"] = "leave_one_out"


class TimeSplit(Strict):
    """Events after `cutoff` are evaluation; set either cutoff (Unix s) or quantile of all timestamps."""

    kind: Literal["time"]
    cutoff: int | None = None
    quantile: float | None = Field(None, gt=0, lt=1)
    valid_fraction: float = Field(0.5, ge=0, le=1, description="share of eval users that go to valid (by user hash)")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.cutoff is None) == (self.quantile is None):
            raise ValueError("set exactly one of cutoff or quantile")
        return self


class DataConfig(Strict):
    source: Source
    output_dir: str = Field("outputs/data/default", description="where the prepared data is published: a local "
                            "path, a shared mount, or an object-store URI (s3://bucket/prefix)")
    overwrite: bool = Field(False, description="replace an existing output atomically; else refuse")
    item_universe: Literal["catalog", "observed"] | None = Field(
        None,
        description="catalog: every item of the source's catalog (movies.dat); observed: items seen in events; "
        "default: catalog where the source has one, else observed",
    )
    split: Annotated[Union[LeaveOneOutSplit, TimeSplit], Field(discriminator="kind")] = Field(
        default_factory=LeaveOneOutSplit
    )
    timestamp_min: int = 631_152_000  # 1990-01-01
    timestamp_max: int = 4_102_444_800  # 2100-01-01
    num_partitions: int = Field(8, gt=0, description="user-hash partitions for sequence building")
    chunk_bytes: int = Field(4 << 20, gt=0, description="text sources are parsed in chunks of about this size")


class ModelConfig(Strict):
    """The encoder; defaults are the paper's MovieLens-1M HSTU recipe."""

    kind: Literal["hstu", "sasrec", "gr", "dlrm"] = Field(
        "hstu", description="hstu/sasrec: sequential retrieval encoders; gr: generative ranking + retrieval over "
        "interleaved items and actions (the HSTU stack); dlrm: the DLRM-style pointwise ranker (see ranking)")
    dim: int = Field(50, gt=0)
    num_blocks: int = Field(2, gt=0)
    num_heads: int = Field(1, gt=0)
    qk_dim: int | None = Field(None, gt=0, description="default dim / num_heads")
    v_dim: int | None = Field(None, gt=0, description="default dim / num_heads")
    ffn_dim: int | None = Field(None, gt=0, description="SASRec only; default dim")
    dropout: float = Field(0.2, ge=0, lt=1)
    max_seq_len: int = Field(200, gt=1, description="N: the longest history the model is built for (position "
                             "tables, relative bias, HSTU's 1/N); saved with the model")
    attention_normalizer: int | None = Field(
        None, gt=0, description="the N of HSTU's 1/N; default max_seq_len (the paper's ML-1M code: 211)")
    attention_impl: Literal["auto", "pytorch", "cpu", "triton"] = Field(
        "auto", description="HSTU attention: auto = Triton on CUDA, the tiled CPU path on CPU (cpu: the bias "
        "gathered per tile, never an L x L tensor); pytorch = the plain reference (materialised bias and scores)")
    attention: Literal["pointwise", "softmax"] = Field(
        "pointwise", description="HSTU only: SiLU(QK^T + rab)/N (the paper) or a causal softmax (its ablation)")
    relative_bias: Literal["both", "position", "time", "none"] = Field(
        "both", description="HSTU only: which terms of rab^{p,t} the attention adds (the paper's ablations)")
    embedding_sharding: Literal["replicated", "row_wise", "auto"] = Field(
        "replicated", description="the item table: a full copy on every worker (replicated), or its rows split "
        "over the workers (row_wise: the catalog is bounded by the workers' memory together); auto: row_wise "
        "when the table with its AdamW state exceeds embedding_memory_share of a worker's memory")
    embedding_memory_share: float = Field(0.25, gt=0, le=1, description="auto: the share of a worker's memory "
                                          "(train.memory_per_worker_gb) the item table may take before it is sharded")

    @model_validator(mode="after")
    def _ablations_are_hstu_options(self):
        if self.kind != "hstu":
            for key, default in (("attention", "pointwise"), ("relative_bias", "both")):
                if getattr(self, key) != default:
                    raise ValueError(f"model.{key}={getattr(self, key)!r} is an HSTU option; model.kind is {self.kind!r}")
        return self

    @model_validator(mode="after")
    def _heads_split_the_width(self):
        # SASRec's heads always split dim; HSTU's (hstu, gr) do unless both head widths are given.
        # dlrm has no heads, but a config that trains it is often re-run as gr, so it is held to the same rule.
        own_widths = self.kind in ("hstu", "gr") and self.qk_dim is not None and self.v_dim is not None
        if self.dim % self.num_heads and not own_widths:
            hint = " (or set qk_dim and v_dim, the width of each head)" if self.kind in ("hstu", "gr") else ""
            raise ValueError(f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}: each head "
                             f"gets dim / num_heads; choose a dim that is a multiple of num_heads{hint}")
        return self


class RankingTask(Strict):
    """One ranking head at item positions. binary: the impression received `action`, or its rating
    (the event's value) is at least `rating_at_least`; regression: the rating itself (MSE)."""

    name: str = Field(min_length=1)
    kind: Literal["binary", "regression"] = "binary"
    action: str | None = Field(None, description="binary: a name of the data's action vocabulary")
    rating_at_least: float | None = Field(None, description="binary: rating >= this (data with ratings)")
    weight: float = Field(1.0, ge=0, description="its share of the ranking loss")

    @model_validator(mode="after")
    def _one_label(self):
        if self.kind == "binary" and (self.action is None) == (self.rating_at_least is None):
            raise ValueError(f"binary task {self.name!r}: set exactly one of action or rating_at_least")
        if self.kind == "regression" and (self.action is not None or self.rating_at_least is not None):
            raise ValueError(f"regression task {self.name!r} predicts the rating: set neither action nor "
                             "rating_at_least")
        return self


class RankingConfig(Strict):
    """Generative ranking (model.kind gr) and its baselines (dlrm, and gr trained pointwise)."""

    tasks: list[RankingTask] = Field(default_factory=list, description="heads at item positions")
    retrieval_weight: float = Field(1.0, ge=0, description="gr: weight of the retrieval loss at action positions "
                                    "in the combined loss (ranking loss + this x retrieval loss)")
    training: Literal["generative", "pointwise"] = Field(
        "generative", description="generative: every impression of a sequence in one causal pass (and "
        "retrieval for gr); pointwise: each example is one history + candidate, cut at a sampled impression, "
        "ranking loss only (the ablation that isolates what generative training buys)")
    pointwise_examples_per_user: int = Field(4, gt=0, description="pointwise: examples drawn per user and epoch")

    @model_validator(mode="after")
    def _distinct_names(self):
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate task names in {names}")
        return self


class BatchingConfig(Strict):
    """How sequences become model batches (genrec.data.batches)."""

    layout: Literal["items", "interleaved"] = "items"
    max_seq_len: int | None = Field(None, gt=1, description="most recent items kept per user; default "
                                    "model.max_seq_len, and never more than the model was built for")
    stochastic_length_alpha: float | None = Field(None, gt=1, le=2, description="Stochastic Length (training only)")


class LrSchedule(Strict):
    """The learning rate per optimizer step, as a share of train.lr (genrec.train.optim.lr_factor). The
    warmup ramps linearly to train.lr over its first steps; the decay then runs over the rest of the run's
    steps (train.epochs x the steps of an epoch), reaching final_lr_fraction x train.lr at the last step."""

    kind: Literal["constant", "warmup_cosine", "warmup_linear"] = Field(
        "constant", description="constant: train.lr at every step (the paper's recipe); warmup_cosine / "
        "warmup_linear: warmup_steps of linear warmup, then a cosine / linear decay to final_lr_fraction")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warmup (step s at (s + 1) / "
                              "warmup_steps of train.lr); 0: the decay starts at train.lr")
    final_lr_fraction: float = Field(0.0, ge=0, le=1, description="the lr at the run's last step, as a share "
                                     "of train.lr (1 with warmup_linear: warmup, then constant)")

    @model_validator(mode="after")
    def _constant_has_no_shape(self):
        if self.kind == "constant":
            for key, value, default in (("warmup_steps", self.warmup_steps, 0),
                                        ("final_lr_fraction", self.final_lr_fraction, 0.0)):
                if value != default:
                    raise ValueError(f"train.lr_schedule.{key}={value!r} does nothing with train.lr_schedule.kind="
                                     f"'constant' (warmup, then constant: kind warmup_linear, final_lr_fraction 1)")
        return self


class TrainConfig(Strict):
    """Optimiser, loss and the Ray Train run; defaults are the paper's recipe."""

    epochs: int = Field(100, gt=0)
    batch_size: int = Field(128, gt=0, description="global batch (users), split over workers")
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = Field(0.0, ge=0)
    lr_schedule: LrSchedule = Field(default_factory=LrSchedule)
    embedding_optimizer: Literal["adamw", "row_sparse_adamw"] = Field(
        "adamw", description="adamw: every row of the item tables moves every step (the paper's recipe); "
        "row_sparse_adamw: only the rows a step's gradient touches (lazy AdamW, as TorchRec's fused "
        "optimizers), at a cost that follows the batch, not the catalog (README Large catalogs)")
    num_negatives: int = Field(128, gt=0)
    temperature: float = Field(0.05, gt=0)
    negatives: Literal["uniform", "in_batch", "mixed"] = Field(
        "uniform", description="uniform: num_negatives draws from the whole catalog (the paper's recipe); in_batch: "
        "num_negatives draws from the batch's targets (popular items more often); mixed: both, 2 x num_negatives "
        "candidates per position")
    log_q_correction: bool = Field(
        False, description="subtract log Q from each negative's logit (after the temperature), Q its expected count "
        "among a position's negatives: num_negatives / items per uniform pool, plus num_negatives x its share of "
        "the training targets per in-batch pool (Yi et al. 2019); undoes in-batch negatives' popularity bias")
    seed: int = 42
    num_workers: int = Field(1, gt=0)
    use_gpu: bool = False
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl with GPUs, else gloo")
    cpus_per_worker: float = Field(1.0, gt=0)
    memory_per_worker_gb: float | None = Field(None, gt=0, description="reserved per worker on the cluster; "
                                               "default: none reserved (model.embedding_sharding auto then "
                                               "assumes this machine's memory / num_workers)")
    threads_per_worker: int | None = Field(None, gt=0, description="torch threads; default cpus_per_worker")
    data_mode: Literal["replicated", "streaming"] = Field(
        "replicated",
        description="replicated: every worker reads the split and takes its rank's slice of each seeded global "
        "batch (results independent of the number of workers); streaming: Ray Data shards per worker",
    )
    train_on: Literal["train", "train_and_valid"] = Field(
        "train", description="train_and_valid: also train on each user's validation target, as the paper's code "
        "does (it has no validation split); the model is then not selected on validation: test is reported "
        "at the last evaluation")
    mode: Literal["epochs", "one_pass"] = Field(
        "epochs", description="epochs: multi-epoch training on the train split with leave-one-out evaluation; "
        "one_pass: one pass over the time-ordered events, each window of train.window_days evaluated (every "
        "event in it ranked) before it is trained on, as in the paper's streaming tables")
    window_days: float = Field(7.0, gt=0, description="one_pass mode: the width of a time window")
    window_passes: int = Field(1, ge=1, description="one_pass mode: each window, once ranked, is trained this "
                               "many times, each pass its own shuffle (1: every event trained once, the paper's "
                               "streaming setting; more: a refresh that learns new items faster, at that many "
                               "times the compute)")
    early_stopping_patience: int | None = Field(None, gt=0, description="evaluations without a better valid NDCG@10")
    steps_per_epoch: int | None = Field(None, gt=0, description="an epoch ends after this many steps (default: one "
                                        "pass over the training split), e.g. a first look at a very large log")
    storage_path: str = Field("outputs/ray_results", description="checkpoints and run folders: a local path, a "
                              "shared mount, or an object-store URI (s3://bucket/prefix; relative paths follow GENREC_ROOT)")
    run_name: str | None = Field(None, description="default: the experiment name; the same name resumes")
    max_failures: int = Field(1, ge=0)
    checkpoints_to_keep: int = Field(2, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _in_batch_negatives_is_negatives(cls, value):
        """train.in_batch_negatives (a bool) was train.negatives before mixed negatives; saved configs hold it."""
        if isinstance(value, dict) and "in_batch_negatives" in value:
            value = dict(value)
            old = value.pop("in_batch_negatives")
            if not isinstance(old, bool):
                raise ValueError(f"train.in_batch_negatives={old!r}: true or false (it is now train.negatives: "
                                 f"uniform, in_batch or mixed)")
            kind = "in_batch" if old else "uniform"
            if value.setdefault("negatives", kind) != kind:
                raise ValueError(f"train.in_batch_negatives={old} contradicts train.negatives={value['negatives']!r}; "
                                 f"give train.negatives alone")
        return value

    @model_validator(mode="after")
    def _one_pass_reads_whole_sequences(self):
        if self.mode == "one_pass":
            if self.log_q_correction:
                raise ValueError("train.log_q_correction=true does not apply to train.mode='one_pass' (Q comes "
                                 "from the training split's item counts, which a pass over time windows does not have)")
            for key, value, default in (("data_mode", self.data_mode, "replicated"), ("train_on", self.train_on, "train")):
                if value != default:
                    raise ValueError(f"train.{key}={value!r} does not apply to train.mode='one_pass' "
                                     f"(it streams the full sequences by time window)")
            if self.lr_schedule.kind != "constant":
                raise ValueError(f"train.lr_schedule.kind={self.lr_schedule.kind!r} does not apply to "
                                 f"train.mode='one_pass' (the run's steps, which the decay spans, are not known "
                                 f"before its windows are read); use 'constant'")
        return self


class EvalConfig(Strict):
    """Full-ranking evaluation during training and by jobs/evaluate.py (genrec.train.evaluation)."""

    every: int = Field(1, gt=0, description="rank the validation split every this many epochs (and at the last)")
    batch_size: int = Field(256, gt=0, description="users per evaluation batch")
    ties: Literal["pessimistic", "optimistic"] = Field(
        "pessimistic", description="an item with exactly the target's score ranks above it (pessimistic) or not")
    test_epochs: list[int] = Field(
        default_factory=list,
        description="also rank the test split after these epochs, whatever validation says (fixed-epoch figures)")
    users: float = Field(
        1.0, gt=0, le=1, description="share of the valid and test users ranked (a fixed sample by user id, the "
        "same in every epoch, run and jobs/evaluate.py; for logs whose held-out users are too many to rank each "
        "epoch); the run's 'evaluation:' line says how many")
    window_users: float = Field(
        1.0, gt=0, le=1, description="train.mode one_pass: share of users whose events each window ranks (a "
        "fixed sample by user id, the same in every window and run); training always uses every event")


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="http://host:port of an `mlflow server` (make mlflow), or "
                                     "a database URI; default $MLFLOW_TRACKING_URI, else sqlite:///<root>/outputs/mlflow.db")
    experiment: str = "genrec"
    registered_model: str | None = Field(None, description="default: the experiment name")


class RayConfig(Strict):
    address: str | None = Field(None, description="None starts a local cluster; 'auto' joins a running one")
    num_cpus: int | None = None
    object_store_memory_gb: float | None = 2.0
    verbose: bool = Field(False, description="also show Ray's own logs (workers, Train, Data) on the terminal; "
                          "they always go to Ray's log files (<temp dir>/session_latest/logs)")

    def joins_cluster(self) -> bool:
        """Whether a job joins a running cluster (address, or a submitted job's RAY_ADDRESS), which may add
        nodes, rather than starting a local one of fixed size (genrec.runtime.init_ray)."""
        return bool(self.address or os.environ.get("RAY_ADDRESS"))


class SweepFamily(Strict):
    """One model family of a sweep: the overrides that make it (e.g. `model.kind: sasrec`) and, optionally,
    its own grid (its keys replace the shared grid's)."""

    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, e.g. model.kind: sasrec")
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class SearchConfig(Strict):
    """Hyper-parameter search on the sweep machinery: `num_samples` configs drawn from `space` per family,
    trained under ASHA, which stops the bad ones early; the best config is written out as a YAML."""

    space: dict[str, dict[Literal["uniform", "loguniform", "choice"], list[Any]]] = Field(
        min_length=1, description="dotted key -> {loguniform: [low, high]} | {uniform: [low, high]} | {choice: [...]}")
    num_samples: int = Field(8, gt=0)
    grace_period: int = Field(1, gt=0, description="epochs every trial trains before ASHA may stop it")
    reduction_factor: int = Field(2, gt=1)
    seed: int = 0


class SweepConfig(Strict):
    """A Ray Tune sweep over this experiment (genrec.train.sweep): every family x every point of its grid
    is one Ray Train trial, an MLflow child run under one parent run; then a power law per family."""

    name: str | None = Field(None, description="default: the experiment name; the same name resumes")
    families: dict[str, SweepFamily] = Field(min_length=1)
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values (a product)")
    points: list[dict[str, Any]] = Field(default_factory=list, description="a list of trials' overrides (dotted "
                                         "key -> value), each crossed with the grid: sizes that go together, e.g. "
                                         "a smaller width with more epochs")
    metric: str = Field("best/valid/ndcg@10", description="what the power law is fitted to, from the last report")
    mode: Literal["max", "min"] = "max"
    fit_points: Literal["all", "frontier"] = Field(
        "all", description="fit every finished trial, or only each family's compute-efficient frontier (the "
        "trials no cheaper trial beats)")
    max_concurrent_trials: int | None = Field(None, gt=0, description="default: as many as the cluster's CPUs "
                                              "(and GPUs) hold at once")
    trial_driver_cpus: float = Field(0.25, ge=0, description="the CPU each trial's driver (the Train run) holds")
    divergence_factor: float | None = Field(
        3.0, gt=1, description="stop a trial whose train loss rises above this x its lowest so far (nan/inf "
        "stop the run inside the loop)")
    storage_path: str = Field("outputs/sweeps", description="Tune's experiment folders: a local path, a shared "
                              "mount or an object-store URI (s3://bucket/prefix)")
    search: SearchConfig | None = None


REFRESH_METRICS = ("ndcg@10", "ndcg@200", "hr@10", "hr@50", "hr@200", "mrr")  # genrec.metrics' retrieval metrics


class RefreshConfig(Strict):
    """jobs/refresh.py: continue the registered model behind an alias on the events since its data cutoff, and
    move the alias to the result only if it is not worse (genrec.train.refresh)."""

    model: str = Field(pattern=r"^models:/[^/@]+@[A-Za-z0-9_-]+$", description="models:/<name>@<alias>: the "
                       "model continued; the alias is what moves when the gate passes")
    files: bool = Field(True, description="read the files of data.source that the model's data did not read "
                        "(not in its manifest's source checksums)")
    events_db: str | None = Field(None, description="also read the events a Serve app logged (its "
                                  "store.events_db, kind embedded) since the model's data cutoff")
    chunks: int = Field(4, gt=1, description="the new window is cut into this many chunks of equal time, each "
                        "ranked before it is trained on; the gate compares chunks 2..N")
    gate_metric: Literal[REFRESH_METRICS] = "ndcg@10"
    gate_margin: float = Field(0.0, ge=0, lt=1, description="the new model may be worse than the current one on "
                               "gate_metric by at most this share of the current value (0: not worse at all)")
    output_dir: str = Field("outputs/data/refreshed", description="each refresh publishes its prepared data (old "
                            "histories + the new window) in a folder of its own under this one")

    @model_validator(mode="after")
    def _reads_something(self):
        if not self.files and self.events_db is None:
            raise ValueError("a refresh with files: false and no events_db reads no events")
        return self


class ExperimentConfig(Strict):
    """A whole experiment: data, model, batching, training, evaluation, tracking, Ray."""

    name: str = "genrec"
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    ranking: RankingConfig = Field(default_factory=RankingConfig)
    sweep: SweepConfig | None = Field(None, description="jobs/sweep.py only: the scaling sweep or search")
    refresh: RefreshConfig | None = Field(None, description="jobs/refresh.py only: which model to keep fresh, "
                                          "from which events, and the gate")

    @model_validator(mode="after")
    def _batches_fit_the_model(self):
        kept = self.batching.max_seq_len
        if kept is not None and kept > self.model.max_seq_len:
            raise ValueError(f"batching.max_seq_len={kept} exceeds model.max_seq_len={self.model.max_seq_len}, "
                             "the longest history the model is built for")
        return self

    @model_validator(mode="after")
    def _ranking_reads_interleaved_batches(self):
        ranker = self.model.kind in ("gr", "dlrm")
        if ranker != (self.batching.layout == "interleaved"):
            raise ValueError(f"batching.layout={self.batching.layout!r} does not fit model.kind={self.model.kind!r}: "
                             "gr and dlrm read the 'interleaved' layout, hstu and sasrec the 'items' layout")
        if ranker and not any(t.kind == "binary" for t in self.ranking.tasks):
            raise ValueError(f"ranking.tasks: model.kind={self.model.kind!r} needs at least one binary task "
                             "(the model is selected on their normalized entropy)")
        return self

    @model_validator(mode="after")
    def _one_pass_ranks_retrieval(self):
        if self.train.mode == "one_pass" and self.model.kind not in ("hstu", "sasrec"):
            raise ValueError(f"train.mode='one_pass' trains the retrieval encoders (model.kind hstu or sasrec), "
                             f"not model.kind={self.model.kind!r}")
        return self

    @property
    def kept_items(self) -> int:
        """How many of each user's most recent items a batch keeps."""
        return self.batching.max_seq_len or self.model.max_seq_len


# ----------------------------------------------------------------------------- serving
# The `args` of the genrec application in a Ray Serve config file (configs/serve/*.yaml);
# Serve's own keys there (http_options, deployments' autoscaling_config, max_ongoing_requests)
# are Ray's schema. See genrec.serve.

class ServeModelConfig(Strict):
    """The model served: the Ingress deployment's `user_config` in a Serve config file, so that changing it
    and `serve deploy`-ing the file rolls the new version out in place (see genrec.serve.rollout)."""

    uri: str = Field(description="a model folder (a local path, or an object-store URI: s3://bucket/prefix/model), "
                     "or an MLflow URI: models:/name/version, models:/name@alias, models:/name/latest, "
                     "runs:/<id>/model_files (an alias is resolved to one version per load)")
    tracking_uri: str | None = Field(None, description="default $MLFLOW_TRACKING_URI, else the file-local sqlite")
    watch_s: float | None = Field(None, gt=0, description="re-resolve the uri this often and roll out the "
                                  "version an alias (or latest) now names; default: only on a config change")


class ServeUserConfig(Strict):
    model: ServeModelConfig = Field(description="the retrieval model, which also ranks unless `ranker` is set")
    ranker: ServeModelConfig | None = Field(
        None, description="a ranking model (e.g. a gr ranker) for /v1/rank and the ranking stage of /v1/recommend, "
        "trained on the same prepared data as `model` (the same item ids); default: `model` ranks too")


class ServeAuthConfig(Strict):
    """Writes (/v1/events) need `Authorization: Bearer <token>`; with no token set they are refused (403)."""

    token: str | None = Field(None, min_length=16, description="prefer the environment variable for real secrets")
    token_env: str = Field("GENREC_SERVE_TOKEN", description="read the token from this variable when token is unset")


class ServeBatchConfig(Strict):
    """@serve.batch of the model deployments: requests of different users scored together."""

    max_batch_size: int = Field(16, gt=0)
    batch_wait_timeout_s: float = Field(0.002, ge=0)


class ServeHnswConfig(Strict):
    m: int = Field(32, ge=4, le=128, description="links per node (memory ~ 2 m ints per item)")
    ef_construction: int = Field(64, gt=0, description="candidate list while building: build time vs recall")
    ef_search: int = Field(128, gt=0, description="candidate list per query (at least k + the history)")


class ServeIvfConfig(Strict):
    nlist: int | None = Field(None, gt=0, description="clusters; default 4 sqrt(items), at most items / 39")
    nprobe: int = Field(32, gt=0, description="clusters searched per query: speed vs recall")


class ServeRetrievalConfig(Strict):
    candidates: int = Field(200, gt=0, description="/v1/recommend: items retrieved, then ranked")
    exclude_history: bool = Field(True, description="never retrieve an item already in the user's history")
    index: Literal["exact", "hnsw", "ivf"] = Field("exact", description="exact: every item's inner product; "
                                                   "hnsw / ivf: a faiss ANN index, for large catalogs")
    hnsw: ServeHnswConfig = Field(default_factory=ServeHnswConfig)
    ivf: ServeIvfConfig = Field(default_factory=ServeIvfConfig)


class ServeRankingConfig(Strict):
    task_weights: dict[str, float] = Field(default_factory=dict, description="combined score = sum of weight x "
                                           "task prediction; tasks not named weigh 1")
    microbatch: int = Field(128, gt=0, description="M-FALCON b_m: candidates per pass")
    cache_bytes: int = Field(64 << 20, ge=0, description="per replica: M-FALCON's per-user K/V cache budget")


class ServeStoreConfig(Strict):
    """Where user histories live: the prepared sequence table, plus the events written through /v1/events in an
    append log, embedded (a sqlite file every replica on this machine opens) or redis (shared by a cluster)."""

    kind: Literal["embedded", "redis"] = Field("embedded", description="the event log: embedded (sqlite, "
                                               "events_db) or redis (redis_url)")
    sequences: str | None = Field(None, description="prepared data folder whose sequence table holds the "
                                  "histories; default the model's data.output_dir")
    events_db: str = Field("outputs/serve/events.sqlite", description="sqlite append log of /v1/events "
                           "(kind embedded; with kind redis only the rollout's last-live-model file sits beside it)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="kind redis: redis://[user:password@]host:port/db, "
                           "rediss:// (TLS) or unix://; the credentials are never logged")
    redis_prefix: str = Field("genrec", min_length=1, max_length=64, description="kind redis: the prefix of every "
                              "key; two apps sharing one Redis need different prefixes")
    redis_durability: Literal["always", "everysec", "none"] = Field("always", description=(
        "kind redis: the persistence the server is expected to have, checked at start (a warning names a setting "
        "that falls short). always: AOF, appendfsync always: an acknowledged event is never lost. everysec: AOF "
        "fsynced once a second: a crash can lose up to about 2 s of acknowledged events (Redis writes them to the "
        "OS at once, but postpones that while an fsync lags). none: no AOF: a restart loses every event since "
        "the last RDB snapshot (all of them without one)"))
    root: str | None = Field(None, description="folder relative paths (these, the model's data folder) are "
                             "taken from; default $GENREC_ROOT, else the replica's working directory")


class ServeConfig(Strict):
    auth: ServeAuthConfig = Field(default_factory=ServeAuthConfig)
    batching: ServeBatchConfig = Field(default_factory=ServeBatchConfig)
    retrieval: ServeRetrievalConfig = Field(default_factory=ServeRetrievalConfig)
    ranking: ServeRankingConfig = Field(default_factory=ServeRankingConfig)
    store: ServeStoreConfig = Field(default_factory=ServeStoreConfig)
    torch_threads: int = Field(1, gt=0, description="per model replica")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where a model replica scores: auto = cuda when the replica has a GPU "
        "(ray_actor_options num_gpus), else cpu; cuda without one fails the load, naming this key")


# Keys that moved to the section that owns them: named in the error instead of "unknown key".
MOVED_KEYS = {
    "data.max_seq_len": "model.max_seq_len (the model's shape) or batching.max_seq_len (what a batch keeps)",
    "data.layout": "batching.layout",
    "train.stochastic_length_alpha": "batching.stochastic_length_alpha",
    "train.eval_every": "eval.every",
    "train.eval_batch_size": "eval.batch_size",
}


# ----------------------------------------------------------------------------- loading

def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b][c] = value for "a.b.c", creating sections on the way (a --set override, a sweep's trial)."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`a.b=3` -> ("a.b", 3); the value is read as YAML so numbers, bools and lists keep their type."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got '{text}'")
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value '{raw}' is not valid YAML ({err})") from None


def _user_path(loc: tuple, tree: Any) -> tuple:
    """A pydantic error location as the user writes the key: without the tags pydantic puts in
    for a union told apart by `kind` (data.source.csv.columns -> data.source.columns)."""
    path, node = [], tree
    for part in loc:
        if isinstance(node, dict) and node.get("kind") == part:
            continue  # the union's tag: the section's own `kind`, not a key of the file
        path.append(part)
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(path)


def _origin_of(path: tuple, origins: dict) -> str | None:
    """The file that set the key at `path` (or its nearest section): the longest known prefix."""
    for end in range(len(path), 0, -1):
        if path[:end] in origins:
            return origins[path[:end]]
    return None


def describe_error(err: ValidationError, origin: str, tree: dict | None = None, origins: dict | None = None) -> str:
    """A pydantic error as genrec's config message: one line per bad key, named by its dotted path.

    With the validated `tree` the path is the one the user wrote; with `origins` (key path -> file,
    from `base:` files and --set) a key that came from another file than `origin` names that file."""
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        path = _user_path(e["loc"], tree) if tree is not None else e["loc"]
        loc = ".".join(str(p) for p in path)
        source = _origin_of(tuple(path), origins or {})
        where = f" (set in {source})" if source and source != origin else ""
        if e["type"] == "extra_forbidden":
            moved = MOVED_KEYS.get(loc)
            lines.append(f"  {loc}: moved to {moved}{where}" if moved else f"  {loc}: unknown key{where}")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            message = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {message}{shown}{where}" if loc else f"  {message}")
    return "\n".join(lines)


# Sections that are a union of models told apart by `kind`: in a file with `base:`, a section of
# another kind than the base's replaces it (a csv source shares no keys with a movielens one).
TAGGED_SECTIONS = {("data", "source"), ("data", "split")}


def _paths(tree: dict, at: tuple = ()) -> list[tuple]:
    """Every key path of a YAML tree, sections and leaves."""
    found = []
    for key, value in tree.items():
        found.append(at + (key,))
        if isinstance(value, dict):
            found += _paths(value, at + (key,))
    return found


def _set_origin(origins: dict, path: tuple, value: Any, source: str) -> None:
    """The value at `path` (and every key under it) now comes from `source`; what was there is gone."""
    for stale in [p for p in origins if p[:len(path)] == path]:
        del origins[stale]
    origins[path] = source
    origins.update({path + sub: source for sub in (_paths(value) if isinstance(value, dict) else [])})


def _merge(base: dict, child: dict, origins: dict, source: str, at: tuple = ()) -> dict:
    """`child` over `base`, sections merged key by key; `origins` (key path -> file) follows what the
    child sets (from `source`) or replaces."""
    merged = dict(base)
    for key, value in child.items():
        path, old = at + (key,), merged.get(key)
        other_kind = path in TAGGED_SECTIONS and isinstance(old, dict) and isinstance(value, dict) \
            and old.get("kind") != value.get("kind", old.get("kind"))
        if isinstance(value, dict) and isinstance(old, dict) and not other_kind:
            origins.setdefault(path, source)
            merged[key] = _merge(old, value, origins, source, path)
            continue
        merged[key] = value
        _set_origin(origins, path, value, source)
    return merged


def _read_yaml(p: Path, seen: tuple = ()) -> tuple[dict, dict]:
    """A YAML mapping and where each key path came from; a top-level `base: other.yaml` (relative
    to this file) is read first and overridden."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"config file {p}: 'base' chain loops back on itself")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top, got {type(tree).__name__}")
    base = tree.pop("base", None)
    if base is None:
        return tree, {path: str(p) for path in _paths(tree)}
    base_tree, origins = _read_yaml(p.parent / base, seen + (p.resolve(),))
    return _merge(base_tree, tree, origins, str(p)), origins


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), model: type[BaseModel] = ExperimentConfig):
    """Read YAML at `path` (or start empty), apply `key=value` overrides, validate into `model`."""
    tree: dict = {}
    origins: dict = {}
    origin = "command line"
    if path is not None:
        tree, origins = _read_yaml(Path(path))
        origin = str(path)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
        _set_origin(origins, tuple(key.split(".")), value, f"--set {key}")
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(describe_error(err, origin, tree, origins)) from None
