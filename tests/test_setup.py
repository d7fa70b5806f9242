"""The package installs as `genrec` without shadowing Python's `platform` module."""

import subprocess
import sys

from conftest import REPO


def run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_no_top_level_init_in_platform():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_torch_and_ray_import_from_repo_root():
    code = (
        "import sys; sys.path.insert(0, '.');"
        "import platform; assert hasattr(platform, 'system'), platform.__file__;"
        "import torch, ray; print(platform.system(), torch.__version__, ray.__version__)"
    )
    result = run(code, REPO)
    assert result.returncode == 0, result.stderr
    assert "Linux" in result.stdout


def test_genrec_imports_from_any_directory(tmp_path):
    result = run("import genrec.data, genrec.config, genrec.data.pipeline; print(genrec.data.__name__)", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "genrec.data"


def test_cluster_yaml_passes_the_launchers_checks():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    validate_config(config)  # the schema checks `ray up` runs; raises on error
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert types["cpu_worker"]["min_workers"] == 0 < types["cpu_worker"]["max_workers"]
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
