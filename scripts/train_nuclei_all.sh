#!/usr/bin/env bash
# The all-data nuclei model (issue 28): the shipped stage-5 network fine-tuned on all 564 DSB2018
# images (unetseg/weights/nuclei_all_split.json; its 17 "val" images are trained on too, so they
# are watched only and choose nothing: the run's last.ckpt is the result, never best.ckpt).
# 4000 steps of stage 5's recipe (lr 3e-4, zoom 0.5), about 65 min on one thread.
#   scripts/train_nuclei_all.sh [RUN_DIR] [extra unetseg-train flags, e.g. --ckpt_path last]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/nuclei_all}; shift || true
DATA=${DATA:-../shared/data/dsb2018}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "${PYTHON:-.venv/bin/python}" scripts/train.py --config configs/nuclei.yaml \
    --data.root "$DATA" --data.split_file unetseg/weights/nuclei_all_split.json \
    --model.pretrained nuclei --trainer.max_epochs 10 --model.lr 0.0003 --data.augmentation.scale 0.5 \
    --trainer.default_root_dir "$RUN_DIR" "$@"
