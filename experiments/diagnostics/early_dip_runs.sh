#!/bin/bash
# LP-FT tail fine-tuning on Lite0 / Digits at 32 px: where does the early i.i.d. dip at p=0.9 come from?
# Usage: ROOT=runs/early_dip CACHE=.linft_cache bash experiments/diagnostics/early_dip_runs.sh
# 48 px (figures/offline_study/diagnostics/early_dip_runs_48px.txt): RES=48 STEPS=3000 DECAY=2500
# ARMS='--p 0.9 --lr 0.001;--p 0.9 --lr 0.0001;--p 0.0 --lr 0.001'
# then: python experiments/diagnostics/summarize_runs.py runs/early_dip  (-> figures/offline_study/diagnostics/early_dip_runs.txt)
L=${LINFT:-linft}
common="--root ${ROOT:-runs/early_dip} --cache-dir ${CACHE:-.linft_cache} --dataset Digits --test-envs optdigits --backbone efficientnet_lite0.in1k --resolution ${RES:-32} --augment false --feature-cache true --dataset-limit 2000 --n-per-domain 1000 --mode tail --head-init probe --steps ${STEPS:-2500} --lr-decay-steps ${DECAY:-2000} --eval-every 125 --traj-start 125 --batch-size 32 --quiet true"
export OMP_NUM_THREADS=1
IFS=";" read -ra arms <<< "${ARMS:---p 0.9 --lr 0.001;--p 0.0 --lr 0.001;--p 0.9 --lr 0.0001;--p 0.5 --lr 0.001}"
for v in "${arms[@]}"; do
  echo "== $v"; date
  nice -n 19 $L train $common $v 2>&1 | tail -3
done
date; echo ALLDONE
