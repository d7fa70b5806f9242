"""benchmarks/gpu_check.py --smoke: every section of the GPU check runs its CPU path (the Triton
kernels in Triton's interpreter) and lands in the JSON and the markdown table, so the script that
a GPU session runs in one call keeps working between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["parity", "kernel_speed", "training", "mfalcon", "ml1m_epoch", "ray_train"]


def test_smoke_run_writes_every_section(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and report["machine"]["device"] == "cpu"
    sections = report["sections"]
    assert list(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] in ("ok", "skipped"), (name, section.get("traceback"))
        assert section["seconds"] >= 0 and section["target"]

    parity = sections["parity"]
    assert parity["met"] and parity["rows"]
    assert {r["mask"] for r in parity["rows"]} == {"causal", "M-FALCON targets"}
    assert all(0 <= r["max_error"] <= r["tolerance"] == 1e-4 for r in parity["rows"])

    speed = sections["kernel_speed"]["rows"]
    assert {(r["setting"], r["pass"]) for r in speed} == {(s, p) for s in ("none", "SL α=1.7")
                                                          for p in ("fwd", "fwd+bwd")}
    assert all(r["fused_ms"] > 0 and r["SDPA_ms"] > 0 and r["speedup"] > 0 and r["fused_tflops"] > 0 for r in speed)
    assert all(r["tokens"] <= r["users"] * r["n"] for r in speed)

    training = sections["training"]
    assert {r["model"] for r in training["rows"]} == {"HSTU-large shape", "HSTU D=256, 8 blocks"}
    assert all(r["device"] == "cpu" and r["tokens_per_s"] > 0 and len(r["losses"]) == r["steps"] + 1
               for r in training["rows"])

    mfalcon = sections["mfalcon"]
    assert all(rate > 0 for rate in mfalcon["candidates_per_s"].values())
    assert mfalcon["max_abs_difference_vs_naive"] < 1e-4  # M-FALCON scores each candidate as the naive way does
    assert "skipped" in sections["ray_train"] and "GPU" in sections["ray_train"]["skipped"]
    assert "skipped" in sections["ml1m_epoch"]  # its CPU path is benchmarks/epoch.py's

    table = (tmp_path / "gpu_check.md").read_text()
    assert "| section | status | seconds | result | target | met |" in table
    for name in SECTIONS:
        assert f"| {name} | {sections[name]['status']} |" in table
    assert "## parity" in table and "## kernel_speed" in table and "## training" in table
