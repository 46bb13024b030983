#!/usr/bin/env bash
# Everything a GPU session should check, in one call (~9 min budget on an H100/H200): the CUDA tests
# (bf16 autocast, channels_last, fused tangent node, primal cache, device loader, trainer), then every
# benchmark at its GPU shape. Each part has its own time limit so one hang cannot eat the session.
# Usage, in the repository root of a GPU machine: bash benchmarks/gpu_check.sh [OUTDIR]
# (PYTHON=... to pick the interpreter; the packages linft needs must be importable. Without the
# Lite0 weights wheel the benchmarks fall back to random weights: throughput does not depend on them.)
set -u
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "   rc=$?"; tail -n 14 "$OUT/$name.txt"
}
run tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests
run linearize_step 110 $PY benchmarks/linearize_step.py
run loop_throughput 110 $PY benchmarks/loop_throughput.py
run multirun 80 $PY benchmarks/multirun.py
run trainer_throughput 120 $PY benchmarks/trainer_throughput.py --quick
