"""GPU check (issue 27): kernel parity and speed, training, M-FALCON and an ML-1M epoch, in one run.

    bash benchmarks/gpu_check.sh                       # on the GPU machine: installs, then runs this
    python benchmarks/gpu_check.py [--out outputs/gpu_check] [--budget-s 480] [--sections parity ...]
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke     # CPU, tiny sizes, under a minute (CI)

Writes gpu_check.json (every number, each section's status, seconds and error) and gpu_check.md
(a summary table with the issue's targets, then one table per section) into --out. Sections:
  parity:       hstu_attention_triton against hstu_attention_reference, values and the gradients of
                q, k, v and both bias tables, fp32 and bf16, causal and with M-FALCON targets, on one
                jagged batch with lengths from 1 to 4096; error = max abs difference / max(1, max |ref|).
  kernel_speed: fused HSTU attention (bias inside) against padded causal SDPA (flash backend on CUDA),
                fwd and fwd+bwd, N = 1024 ... 8192, long-tailed jagged batches, without and with
                Stochastic Length (benchmarks/attention.py's batches and timing).
  training:     tokens/s of a full training step (benchmarks/train_throughput.py) of HSTU-large's shape
                and of a D=256, 8-block HSTU, on the GPU (fp32 and bf16 autocast) and on this machine's CPU.
  ray_train:    a short train.use_gpu run through Ray Train with one worker (needs ray and mlflow).
  mfalcon:      candidates/s at n = m = 1024, M-FALCON (cache miss and hit) against the naive way
                (benchmarks/mfalcon.py's model and inputs).
  ml1m_epoch:   one ML-1M epoch and one evaluation of HSTU-large (benchmarks/epoch.py), if prepared.
A failing section records its error and the run goes on; sections left when --budget-s has passed
are skipped with a note. --smoke runs every section's CPU path at tiny sizes (the Triton kernels in
Triton's interpreter; ray_train is skipped there: it needs a GPU, and tests/test_train.py covers the
same trainer on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2}  # fp32: tl.dot rounds fp32 operands to TF32 on the GPU
INTERPRETER_TOLERANCE = {"float32": 1e-4}  # the interpreter computes fp32 exactly; its bf16 tl.dot is wrong
TARGETS = {
    "parity": "every case within its tolerance",
    "kernel_speed": "fused fwd+bwd >= 5x padded SDPA at N = 8192, jagged, no SL",
    "training": "GPU step >= 20x the CPU step, HSTU-large",
    "mfalcon": "M-FALCON (cache miss) >= 100x naive at n = m = 1024",
    "ml1m_epoch": "vs the paper's code on CPU: 114.4 s (train + eval)",
    "ray_train": "the run completes with use_gpu: true",
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- parity

def parity_errors(fused, batch_args: list, reference_args: list, seed: int = 1) -> dict[str, float]:
    """Scaled max abs difference of the output and the five gradients, fused vs reference."""
    from genrec.model.ops.hstu_attention_reference import hstu_attention_reference

    results = []
    for fn, args in ((fused, batch_args), (hstu_attention_reference, reference_args)):
        out = fn(*args)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
        results.append([out, *torch.autograd.grad(out, [args[i] for i in (0, 1, 2, 6, 7)], grad_out)])
    names = ["out", "grad_q", "grad_k", "grad_v", "grad_position_weights", "grad_time_weights"]
    return {name: float((got.float() - want.float()).abs().max()) / max(1.0, float(want.abs().max()))
            for name, got, want in zip(names, *results)}


def section_parity(args, device: torch.device) -> dict:
    from attention import make_batch, trainable

    from genrec.model.ops.hstu_attention_triton import hstu_attention_triton

    if args.smoke:
        lengths, n, tolerance = [1, 5, 31, 33, 64, 70], 80, INTERPRETER_TOLERANCE
        shapes, dtypes = [(2, 8)], ["float32"]
    else:
        lengths, n, tolerance = [4096, 1, 2, 17, 31, 32, 33, 100, 777, 1000, 2048, 3001], 4096, TOLERANCE
        shapes, dtypes = [(2, 25), (2, 64)], ["float32", "bfloat16"]  # (heads, head dim): HSTU-large's, and 64
    lengths = np.array(lengths)
    cycle = [1024, 1, 0, 7, 33]  # candidates per user, at most its length: the sixth user is all candidates
    num_targets = torch.tensor([min(int(x), cycle[i % 5]) for i, x in enumerate(lengths)], device=device)
    rows = []
    for heads, dim in shapes:
        for dtype in dtypes:
            torch.manual_seed(0)
            batch = make_batch(lengths, n, heads, dim, getattr(torch, dtype), device)["hstu"]
            for mask, targets in (("causal", None), ("M-FALCON targets", num_targets)):
                fused_args = trainable(batch + [targets])
                # the reference in fp32 on the same rounded inputs
                reference_args = trainable([a.float() if i < 3 else a for i, a in enumerate(batch)] + [targets])
                errors = parity_errors(hstu_attention_triton, fused_args, reference_args)
                worst = max(errors.values())
                rows.append({"heads": heads, "head_dim": dim, "dtype": dtype, "mask": mask, "max_error": worst,
                             "tolerance": tolerance[dtype], "ok": worst <= tolerance[dtype], "errors": errors})
    return {"rows": rows, "lengths": lengths.tolist(), "num_positions": n,
            "skipped_dtypes": "bfloat16 (the interpreter's tl.dot mis-computes it)" if args.smoke else None,
            "met": all(r["ok"] for r in rows)}


# ---------------------------------------------------------------- kernel speed

def section_kernel_speed(args, device: torch.device, deadline: float) -> dict:
    import torch.nn.functional as F

    from attention import SETTINGS, make_batch, measure, synthetic_lengths

    from genrec.data.batches import stochastic_length

    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from genrec.model.ops.hstu_attention_triton import hstu_attention_triton as fused

        def sdpa(q, k, v):  # the flash backend, or an error: no silent fallback to the math kernel
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dtype, lengths, tokens, heads, dim, reps = torch.bfloat16, [1024, 2048, 4096, 8192], 65536, 4, 64, 5
    else:  # the CPU's fused op; the Triton kernels' CPU path is the parity section
        from genrec.model.ops.hstu_attention_cpu import hstu_attention_cpu as fused

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        dtype, lengths, tokens, heads, dim, reps = torch.float32, [32, 64], 256, 2, 8, 1
    impls = {"fused": (fused, "hstu"), "SDPA": (sdpa, "sdpa")}
    rows, rng = [], np.random.default_rng(0)
    for n in lengths:
        if time.monotonic() > deadline:
            return {"rows": rows, "truncated": f"budget reached before N = {n}"}
        full = synthetic_lengths(n, tokens, rng)
        for setting, alpha in SETTINGS:
            kept = full if alpha is None else stochastic_length(full, n, alpha, rng)
            batch = make_batch(kept, n, heads, dim, dtype, device)
            real_pairs = float((kept * (kept + 1) / 2).sum())
            padded_pairs = len(kept) * kept.max() * (kept.max() + 1) / 2
            for backward, name in ((False, "fwd"), (True, "fwd+bwd")):
                r = measure(impls, batch, backward, reps, device, memory=device.type == "cuda")
                flops_per_pair = 2 * 2 * heads * dim * (3.5 if backward else 1)  # 2 matmuls fwd, 7 in all
                row = {"n": n, "setting": setting, "users": int(len(kept)), "tokens": int(kept.sum()), "pass": name}
                for impl, value in r.items():
                    row[f"{impl}_ms"] = None if value is None else value[0] * 1e3  # None: out of memory
                    row[f"{impl}_mb"] = None if value is None or device.type == "cpu" else value[1] / 2**20
                for impl, pairs, key in (("fused", real_pairs, "fused_tflops"),
                                         ("SDPA", real_pairs, "sdpa_tflops_real"),
                                         ("SDPA", padded_pairs, "sdpa_tflops_padded")):
                    row[key] = None if r[impl] is None else flops_per_pair * pairs / r[impl][0] / 1e12
                row["speedup"] = None if None in (r["fused"], r["SDPA"]) else r["SDPA"][0] / r["fused"][0]
                rows.append(row)
    target = [r["speedup"] for r in rows if r["n"] == 8192 and r["setting"] == "none" and r["pass"] == "fwd+bwd"]
    return {"rows": rows, "heads": heads, "head_dim": dim, "dtype": str(dtype).removeprefix("torch."),
            "tokens_per_batch": tokens, "reps": reps,
            "tflops_note": "useful FLOPs: the causal half of the real tokens; sdpa_tflops_padded counts the padding",
            "met": (target[0] is not None and target[0] >= 5) if target else None}


# ---------------------------------------------------------------- training

def training_models(smoke: bool) -> dict:
    from train_throughput import NUM_ITEMS

    from genrec.model import EncoderConfig

    if smoke:
        return {"HSTU-large shape": (EncoderConfig("hstu", NUM_ITEMS, 32, 50, 2, 2, 25, 25, dropout=0.2), 256),
                "HSTU D=256, 8 blocks": (EncoderConfig("hstu", NUM_ITEMS, 32, 32, 2, 2, dropout=0.2), 256)}
    # HSTU-large as configs/ml-1m/hstu-large.yaml (N = 200, ~128 users a batch); the larger one at N = 1024
    return {"HSTU-large shape": (EncoderConfig("hstu", NUM_ITEMS, 200, 50, 8, 2, 25, 25, dropout=0.2), 16384),
            "HSTU D=256, 8 blocks": (EncoderConfig("hstu", NUM_ITEMS, 1024, 256, 8, 4, dropout=0.2), 16384)}


def section_training(args, device: torch.device) -> dict:
    from train_throughput import most_recent, step_seconds, synthetic_users

    cpu = torch.device("cpu")
    runs = [(cpu, None, 1 if args.smoke else 2)]
    if device.type == "cuda":
        runs += [(device, None, 5), (device, torch.bfloat16, 5)]
    if not args.smoke:  # the CPU baseline takes every core of the GPU machine
        torch.set_num_threads(os.cpu_count())
    rows = []
    for name, (config, tokens) in training_models(args.smoke).items():
        users = synthetic_users(config.num_positions, tokens, np.random.default_rng(0))
        total = int(users["lengths"].sum())
        for where, autocast, steps in runs:
            losses = []
            seconds = step_seconds("HSTU", config.num_positions, most_recent(users, users["lengths"], where), steps,
                                   where, config=config, autocast=autocast, losses=losses)
            rows.append({"model": name, "device": where.type, "precision": "bf16 autocast" if autocast else "fp32",
                         "n": config.num_positions, "dim": config.dim, "blocks": config.num_blocks,
                         "users": int(len(users["lengths"])), "tokens": total, "steps": steps,
                         "tokens_per_s": total / statistics.median(seconds), "losses": [float(x) for x in losses]})
    summary = {}
    for name in training_models(args.smoke):
        by = {(r["device"], r["precision"]): r for r in rows if r["model"] == name}
        base = by[("cpu", "fp32")]["tokens_per_s"]
        summary[name] = {f"{d} {p} / cpu fp32": r["tokens_per_s"] / base for (d, p), r in by.items()}
        if ("cuda", "bf16 autocast") in by:  # same weights, batch and negatives: the loss curves should agree
            fp32, bf16 = by[("cuda", "fp32")]["losses"], by[("cuda", "bf16 autocast")]["losses"]
            summary[name]["bf16 max relative loss difference"] = max(abs(a - b) / abs(a) for a, b in zip(fp32, bf16))
    large = summary["HSTU-large shape"].get("cuda fp32 / cpu fp32")
    return {"rows": rows, "ratios": summary, "cpu_threads": torch.get_num_threads(),
            "note": "synthetic batches (benchmarks/train_throughput.py), item ids up to 10,000, AdamW, sampled "
                    "softmax; bf16 quality is judged only by the loss curve on the repeated batch",
            "met": None if large is None else large >= 20}


# ---------------------------------------------------------------- Ray Train with use_gpu

RAY_TRAIN_CHILD = "--ray-train-child"


def ray_train_child(result_path: str) -> None:
    """Run in a subprocess (a Ray Train run that cannot place its worker waits forever: the parent
    times it out). A tiny synthetic experiment, train.use_gpu: true, one worker."""
    import ray

    from genrec.config import ExperimentConfig
    from genrec.data.pipeline import prepare
    from genrec.train.trainer import fit

    root = Path(tempfile.mkdtemp(prefix="gpu_check_ray_"))
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, _temp_dir=str(root / "ray"))
    cfg = ExperimentConfig.model_validate({
        "name": "gpu-check",
        "data": {"source": {"kind": "synthetic", "num_users": 2000, "num_items": 500, "mean_events_per_user": 40,
                            "num_shards": 2, "path": str(root / "raw")},
                 "output_dir": str(root / "data"), "num_partitions": 2},
        "model": {"kind": "hstu", "dim": 64, "num_blocks": 2, "num_heads": 2, "dropout": 0.0, "max_seq_len": 64},
        "train": {"epochs": 2, "batch_size": 128, "num_negatives": 64, "storage_path": str(root / "runs"),
                  "use_gpu": True, "num_workers": 1, "cpus_per_worker": 2, "seed": 0},
        "tracking": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "gpu-check"},
    })
    prepare(cfg.data, log=lambda *_: None)
    lines = []
    started = time.perf_counter()
    result = fit(cfg, log=lines.append)
    summary = {"seconds": time.perf_counter() - started, "epochs_run": result["epochs_run"],
               "best": {k: v for k, v in result["best"].items() if isinstance(v, (int, float))},
               "cluster_gpus": ray.cluster_resources().get("GPU", 0), "log": lines[-5:]}
    Path(result_path).write_text(json.dumps(summary))


def section_ray_train(args, device: torch.device, deadline: float) -> dict:
    if args.smoke or device.type != "cuda":
        return {"skipped": "needs a GPU (tests/test_train.py runs the same trainer on CPU)"}
    import importlib.util

    missing = [m for m in ("ray", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"not installed here: {', '.join(missing)} (see benchmarks/gpu_check.sh)"}
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder, "ray_train.json")
        timeout = max(30, min(240, deadline - time.monotonic()))
        child = subprocess.run([sys.executable, __file__, RAY_TRAIN_CHILD, str(result_path)], capture_output=True,
                               text=True, timeout=timeout)
        if child.returncode != 0:
            raise RuntimeError(f"Ray Train run failed ({child.returncode}): {child.stderr[-2000:]}")
        result = json.loads(result_path.read_text())
    return {**result, "met": result["epochs_run"] >= 1 and result["cluster_gpus"] >= 1}


# ---------------------------------------------------------------- M-FALCON

def section_mfalcon(args, device: torch.device) -> dict:
    from mfalcon import history, naive, timed

    from genrec.model.encoder_config import EncoderConfig
    from genrec.model.hstu import HSTU
    from genrec.model.mfalcon import DEFAULT_MICROBATCH, candidate_hidden, encode_history

    n, m, naive_batch, rounds = (32, 32, 8, 1) if args.smoke else (1024, 1024, 64, 3)
    torch.manual_seed(0)
    config = EncoderConfig(num_positions=n + 1, dim=50, num_blocks=2, num_heads=1, dropout=0.0)
    blocks = HSTU(config).eval().to(device)
    x, timestamps, request_time = history(n, config.dim, seed=n)
    x, timestamps = x.to(device), timestamps.to(device)
    candidates = torch.randn(m, config.dim, generator=torch.Generator().manual_seed(1)).to(device)

    def clocked(fn):
        def run():
            out = fn()
            sync(device)
            return out
        return timed(run, time.perf_counter)

    with torch.no_grad():
        cache = encode_history(blocks, x, timestamps)
        ways = {"miss": lambda: candidate_hidden(blocks, encode_history(blocks, x, timestamps), candidates,
                                                 request_time, DEFAULT_MICROBATCH),
                "hit": lambda: candidate_hidden(blocks, cache, candidates, request_time, DEFAULT_MICROBATCH),
                "naive": lambda: naive(blocks, x, timestamps, request_time, candidates[:naive_batch])}
        seconds = {way: [] for way in ways}
        for round_ in range(rounds + 1):  # the first is warm-up (Triton compiles)
            for way, fn in ways.items():
                spent, out = clocked(fn)
                if round_:
                    seconds[way].append(spent)
        hit = ways["hit"]()
        difference = float((hit[:naive_batch] - ways["naive"]()).abs().max())
    rates = {"naive": naive_batch / statistics.median(seconds["naive"]),
             "miss": m / statistics.median(seconds["miss"]), "hit": m / statistics.median(seconds["hit"])}
    return {"n": n, "m": m, "model": "HSTU D=50, 2 blocks, 1 head (the paper's ML-1M shape), fp32",
            "candidates_per_s": rates, "naive_timed_on": naive_batch, "miss_vs_naive": rates["miss"] / rates["naive"],
            "hit_vs_naive": rates["hit"] / rates["naive"], "hit_vs_miss": rates["hit"] / rates["miss"],
            "max_abs_difference_vs_naive": difference,
            "met": rates["miss"] / rates["naive"] >= 100 if device.type == "cuda" else None}


# ---------------------------------------------------------------- ML-1M epoch

def section_ml1m_epoch(args, device: torch.device) -> dict:
    if args.smoke:  # its full validation ranking alone takes half a minute on 2 CPU cores
        return {"skipped": "smoke: the same code runs on CPU as `python benchmarks/epoch.py --steps 2`"}
    from epoch import PAPER_CODE_SECONDS, run_epoch

    from genrec.config import load_config

    cfg = load_config(REPO / "configs/ml-1m/paper-hstu-large.yaml")
    prepared = Path(cfg.data.output_dir)
    if not prepared.is_absolute():
        prepared = REPO / prepared
    if not (prepared / "manifest.json").exists():
        return {"skipped": f"no prepared ML-1M at {prepared}: run `python jobs/prepare.py --config "
                           "configs/ml-1m/data.yaml` (needs Ray) and carry outputs/data/ml-1m"}
    os.chdir(REPO)  # the recipe's paths are relative to the repository
    r = run_epoch(cfg, "auto", None, device=device.type)
    paper = sum(PAPER_CODE_SECONDS[cfg.name])
    total = r["train"] + r["eval"]
    return {"recipe": cfg.name, "train_s": r["train"], "eval_s": r["eval"],
            "total_s": total, "train_tokens_per_s": r["tokens"] / r["train"], "loss": r["loss"],
            "valid_ndcg_at_10": r["ndcg"], "paper_code_cpu_s": paper,
            "speedup_vs_paper_code_cpu": paper / total,
            "note": "train time includes the Triton kernels' compilation", "met": None}


# ---------------------------------------------------------------- driver

def machine_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
            "python": platform.python_version(), "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def run_sections(args, device: torch.device) -> dict:
    started = time.monotonic()
    deadline = started + args.budget_s
    calls = {
        "parity": lambda: section_parity(args, device),
        "kernel_speed": lambda: section_kernel_speed(args, device, deadline),
        "training": lambda: section_training(args, device),
        "mfalcon": lambda: section_mfalcon(args, device),
        "ml1m_epoch": lambda: section_ml1m_epoch(args, device),
        "ray_train": lambda: section_ray_train(args, device, deadline),
    }
    sections = {}
    for name in args.sections or list(calls):
        if time.monotonic() > deadline:
            sections[name] = {"status": "skipped", "seconds": 0.0, "note": f"--budget-s {args.budget_s} reached"}
            continue
        section_start = time.monotonic()
        try:
            result = calls[name]()
            status = "skipped" if "skipped" in result else "ok"
        except Exception as error:  # one failing section must not cost the others their GPU time
            result, status = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}, \
                "failed"
        sections[name] = {"status": status, "seconds": time.monotonic() - section_start, "target": TARGETS[name],
                          **result}
        print(f"[gpu_check] {name}: {status} in {sections[name]['seconds']:.1f} s", flush=True)
    return sections


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"
    return str(value)


def headline(name: str, s: dict) -> str:
    if s["status"] != "ok":
        return s.get("error") or s.get("skipped") or s.get("note", "")
    if name == "parity":
        ok = sum(r["ok"] for r in s["rows"])
        return f"{ok}/{len(s['rows'])} cases within tolerance, worst {fmt(max(r['max_error'] for r in s['rows']))}"
    if name == "kernel_speed":
        last = [r for r in s["rows"] if r["pass"] == "fwd+bwd" and r["n"] == s["rows"][-1]["n"]]
        return ", ".join(f"N={r['n']} {r['setting']} fwd+bwd {fmt(r['speedup'])}x SDPA" for r in last)
    if name == "training":
        return "; ".join(f"{model}: " + ", ".join(f"{k} {fmt(v)}" for k, v in ratios.items())
                         for model, ratios in s["ratios"].items())
    if name == "mfalcon":
        return (f"n=m={s['n']}: miss {fmt(s['miss_vs_naive'], 0)}x, hit {fmt(s['hit_vs_naive'], 0)}x naive, "
                f"hit {fmt(s['hit_vs_miss'], 1)}x miss")
    if name == "ml1m_epoch":
        return (f"train {fmt(s['train_s'], 1)} s + eval {fmt(s['eval_s'], 1)} s, "
                f"{fmt(s['speedup_vs_paper_code_cpu'], 1)}x the paper's code on CPU")
    return f"{s['epochs_run']} epochs in {fmt(s['seconds'], 1)} s, cluster GPUs {fmt(s['cluster_gpus'])}"


def table(rows: list[dict], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]


SECTION_COLUMNS = {
    "parity": ["heads", "head_dim", "dtype", "mask", "max_error", "tolerance", "ok"],
    "kernel_speed": ["n", "setting", "users", "tokens", "pass", "fused_ms", "SDPA_ms", "speedup", "fused_tflops",
                     "sdpa_tflops_real", "sdpa_tflops_padded", "fused_mb", "SDPA_mb"],
    "training": ["model", "device", "precision", "n", "dim", "blocks", "users", "tokens", "steps", "tokens_per_s"],
}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU check: {m['device']} (torch {m['torch']}, CUDA {m['cuda']}, triton {m['triton']})", "",
             f"{'smoke run (tiny sizes, CPU)' if report['smoke'] else 'full run'}; {report['started']}; "
             f"total {report['total_s']:.0f} s of a {report['budget_s']} s budget", "",
             "| section | status | seconds | result | target | met |", "|---|---|---:|---|---|---|"]
    for name, s in report["sections"].items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.1f} | {headline(name, s)} | {s.get('target', '')} "
                     f"| {fmt(s.get('met'))} |")
    for name, columns in SECTION_COLUMNS.items():
        s = report["sections"].get(name, {})
        if s.get("rows"):
            lines += ["", f"## {name}", "", *table(s["rows"], columns)]
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == RAY_TRAIN_CHILD:
        return ray_train_child(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--budget-s", type=float, default=480, help="sections not started by then are skipped")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (set TRITON_INTERPRET=1)")
    parser.add_argument("--sections", nargs="+", choices=list(TARGETS), help="only these (default: all)")
    args = parser.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--smoke runs the Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    out = Path(args.out).resolve()  # before a section moves to the repository's root
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    sys.path.insert(0, str(Path(__file__).parent))  # attention.py, mfalcon.py, ... beside this file
    started = time.monotonic()
    report = {"smoke": args.smoke, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "budget_s": args.budget_s, "machine": machine_info(device), "tolerances": TOLERANCE,
              "sections": run_sections(args, device)}
    report["total_s"] = time.monotonic() - started
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
