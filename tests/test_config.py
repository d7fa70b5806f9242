import pytest

from genrec.config import ConfigError, ExperimentConfig, load_config

GOOD = """
name: t
data:
  source: {kind: movielens, path: /some/where}
model:
  max_seq_len: 50
"""


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["model.max_seq_len=200", "data.split={kind: time, quantile: 0.9}"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.max_seq_len == 200
    assert cfg.data.split.kind == "time" and cfg.data.split.quantile == 0.9
    assert cfg.data.source.ratings_file == "ratings.dat"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.max_seq_lenn: unknown key"):
        load_config(write(tmp_path, GOOD), ["model.max_seq_lenn=3"])


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.max_seq_len: .*integer.*'abc'"):
        load_config(write(tmp_path, GOOD), ["model.max_seq_len=abc"])


def test_wrong_source_kind_and_missing_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.source"):
        load_config(write(tmp_path, GOOD), ["data.source.kind=ftp"])
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_config(write(tmp_path, "name: x\n"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed"))
    with pytest.raises(ConfigError, match="key=value"):
        load_config(write(tmp_path, GOOD), ["model.max_seq_len"])


def test_shipped_configs_are_valid():
    from conftest import REPO

    from genrec.serve.deploy import load_serve_file

    files = sorted((REPO / "configs").rglob("*.yaml"))
    serve_files = [p for p in files if p.parent.name == "serve"]  # Ray Serve config files: their own schema
    assert files and serve_files
    for path in files:
        load_serve_file(path) if path in serve_files else load_config(path)


def test_base_files_are_merged_under_the_child(tmp_path):
    (tmp_path / "parent.yaml").write_text(GOOD + "train: {epochs: 7, lr: 0.5}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\nname: child\ntrain: {epochs: 3}\n")
    cfg = load_config(child)
    assert cfg.name == "child" and cfg.train.epochs == 3 and cfg.train.lr == 0.5
    assert cfg.model.max_seq_len == 50  # from the parent
    child.write_text("base: child.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(child)


def test_moved_keys_say_where_they_went(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.max_seq_len: moved to model\.max_seq_len"):
        load_config(write(tmp_path, GOOD), ["data.max_seq_len=100"])
    with pytest.raises(ConfigError, match=r"train\.stochastic_length_alpha: moved to batching"):
        load_config(write(tmp_path, GOOD), ["train.stochastic_length_alpha=1.6"])


def test_batches_cannot_keep_more_than_the_model_was_built_for(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["batching.max_seq_len=30"])
    assert cfg.kept_items == 30
    assert load_config(write(tmp_path, GOOD)).kept_items == 50  # default: the model's N
    with pytest.raises(ConfigError, match=r"batching\.max_seq_len=60 exceeds model\.max_seq_len=50"):
        load_config(write(tmp_path, GOOD), ["batching.max_seq_len=60"])


def test_a_base_source_of_another_kind_is_replaced_and_bad_keys_name_their_file(tmp_path):
    # the base is MovieLens; the child's csv source shares none of its keys (ratings_file, movies_file ...)
    (tmp_path / "parent.yaml").write_text(GOOD + "train: {epochs: 7}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent.yaml\ndata:\n  source: {kind: csv, path: /logs, delimiter: ';'}\n")
    cfg = load_config(child)
    assert cfg.data.source.kind == "csv" and cfg.data.source.delimiter == ";" and cfg.train.epochs == 7
    # the same kind is still merged key by key
    child.write_text("base: parent.yaml\ndata:\n  source: {ratings_file: r.dat}\n")
    cfg = load_config(child)
    assert (cfg.data.source.path, cfg.data.source.ratings_file) == ("/some/where", "r.dat")
    # a bad key names the file it came from when that is not the file loaded
    (tmp_path / "parent.yaml").write_text(GOOD + "train: {epochz: 7}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(child, ["model.dimm=3"])
    message = str(raised.value)
    assert f"invalid config ({child}):" in message
    assert f"train.epochz: unknown key (set in {tmp_path / 'parent.yaml'})" in message
    assert "model.dimm: unknown key (set in --set model.dimm)" in message


def test_error_paths_are_the_keys_as_written(tmp_path):
    # pydantic puts the union's tag in the path (data.source.csv.columns); the message does not
    config = write(tmp_path, "data:\n  source: {kind: csv, path: /x, columns: {user: u}}\n  split: {kind: time}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    message = str(raised.value)
    assert "data.source.columns.user: unknown key" in message
    assert "data.split: set exactly one of cutoff or quantile" in message
    assert ".csv." not in message and "split.time" not in message and "Value error" not in message


@pytest.mark.parametrize("kind", ["hstu", "gr", "sasrec", "dlrm"])
def test_a_width_the_heads_cannot_split_is_refused_for_every_kind(tmp_path, kind):
    layout = "interleaved" if kind in ("gr", "dlrm") else "items"
    tasks = "ranking: {tasks: [{name: like, action: rating_5}]}\n" if layout == "interleaved" else ""
    config = write(tmp_path, GOOD + f"batching: {{layout: {layout}}}\n" + tasks)
    with pytest.raises(ConfigError, match=r"model\.dim=50 is not divisible by model\.num_heads=3"):
        load_config(config, [f"model.kind={kind}", "model.num_heads=3"])
    assert load_config(config, [f"model.kind={kind}", "model.num_heads=2"]).model.num_heads == 2
    if kind in ("hstu", "gr"):  # HSTU heads with widths of their own need not split dim
        cfg = load_config(config, [f"model.kind={kind}", "model.num_heads=3", "model.qk_dim=16", "model.v_dim=16"])
        assert cfg.model.num_heads == 3
