#!/usr/bin/env bash
# The GPU check of issue 27 (benchmarks/gpu_check.py) with the installs it needs, in one command.
#
#   bash benchmarks/gpu_check.sh --prepare        # once, HERE (a machine with pip, the venv and Ray)
#   bash benchmarks/gpu_check.sh [OUT] [ARGS...]  # on the GPU machine; ARGS go to gpu_check.py;
#                                                 # OUT defaults to $OUT, else outputs/gpu_check
# With this workplace's device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl", "outputs/data/ml-1m"], timeout_s=600)
# It writes gpu_check.json, gpu_check.md, gpu_check.log and kernel_test.log into OUT.
#
# Assumptions (the GPU machines of /work/.library/device/KINDS.md, read 2026-11):
# - `python3` there holds PyTorch with CUDA and Triton (torch 2.11+cu130, Python 3.12), and nothing can be
#   downloaded there: no venv, no `pip install torch` or `pip install -e .` from PyPI. genrec (the folder
#   platform/) goes on the path as it is, and what is missing there travels as wheels in .whl/: pydantic,
#   which genrec.config and genrec.data need (numpy, pandas, pyarrow, pyyaml, psutil, pytest are there).
# - Ray and MLflow are not there and cannot travel (ray's wheel alone is 76 MiB, over the 64 MiB a call
#   may carry): the ray_train section then records a skip. Where pip can reach PyPI, set PIP_ONLINE=1 to
#   `pip install -e .` instead (it then needs torch >= 2.13 with CUDA from PyPI too).
# - Preparing ML-1M needs Ray, so --prepare does it here into outputs/data/ml-1m, which travels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  PYTHON=${PYTHON_HERE:-.venv/bin/python}
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # pydantic and its own needs, for the GPU machine's Python 3.12; the versions of this venv
  versions=$("$PYTHON" -m pip list --format=freeze | grep -iE '^(pydantic|pydantic.core|annotated.types|typing.inspection|typing.extensions)==')
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $versions
  [ -d outputs/data/ml-1m/train ] || "$PYTHON" jobs/prepare.py --config configs/ml-1m/data.yaml
  du -sh .whl outputs/data/ml-1m
  exit 0
fi

out=${OUT:-outputs/gpu_check}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out=$1; shift; fi  # a first argument not an option: the folder
mkdir -p "$out"
site=/tmp/genrec-site
mkdir -p "$site"
if [ "${PIP_ONLINE:-0}" = "1" ]; then
  "$PYTHON" -m pip install -q -e .
else
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  fi
  ln -sfn "$PWD/platform" "$site/genrec"  # `import genrec` without installing the package
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "triton", triton.__version__)'
# A failing section is recorded in the JSON, so the script's own status is kept for the end.
status=0
"$PYTHON" benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log" || status=$?
# The kernel test that skips without CUDA, at real sizes on the GPU.
"$PYTHON" -m pytest tests/test_attention_kernels.py -k on_gpu -q -p no:cacheprovider 2>&1 \
  | tee "$out/kernel_test.log" || status=$?
exit $status
