#!/bin/bash
# The offline study (experiments/offline_study.toml), every part in priority order, 2 runs at a time on
# a 2-core machine; resumable (finished runs are skipped, killed ones resume), then its analyses and
# results. Usage: ROOT=runs/offline_study CACHE=.linft_cache bash experiments/offline_study.sh
set -u
ROOT=${ROOT:-runs/offline_study}
CACHE=${CACHE:-.linft_cache}
PY=${PY:-python}
export OMP_NUM_THREADS=1
for variant in paper linear random_trunk rates arms epochs linear_p0 long; do
  echo "== $variant $(date -u +%H:%M:%S)"
  $PY -m linft sweep launch experiments/offline_study.toml --variant "$variant" --root "$ROOT" \
      --cache-dir "$CACHE" --jobs 2
done
echo "== analyses $(date -u +%H:%M:%S)"
$PY experiments/offline_study_analyses.py "$ROOT"
echo "== results $(date -u +%H:%M:%S)"
$PY -m linft study "$ROOT" --out figures/offline_study --fixed-steps 1500 --epochs 4.8
echo "== done $(date -u +%H:%M:%S)"
