#!/usr/bin/env bash
# Ship the all-data nuclei model (issue 28) trained by scripts/train_nuclei_all.sh: its last.ckpt (never
# best.ckpt: its watched images are trained on, so they choose nothing), slimmed to float16 weights,
# with the post-processing settings and TTA default of the model it was fine-tuned from (tuned on
# images that model never trained on; nothing is tuned again on images the new one trained on).
#   scripts/ship_nuclei_all.sh [RUN_DIR] [TARGET]     # defaults: runs/nuclei_all unetseg/weights/nuclei.ckpt
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/nuclei_all}
TARGET=${2:-unetseg/weights/nuclei.ckpt}
PY=${PYTHON:-.venv/bin/python}
LAST="$RUN_DIR/checkpoints/last.ckpt"
[ -f "$LAST" ] || { echo "no $LAST: train it first (scripts/train_nuclei_all.sh $RUN_DIR)" >&2; exit 2; }
SLIM=$(mktemp --suffix .ckpt)
trap 'rm -f "$SLIM"' EXIT
"$PY" scripts/ship_weights.py "$LAST" "$SLIM"
"$PY" - "$SLIM" "$TARGET" <<'EOF'
import sys

from unetseg.models.checkpoint import load_net, store_postprocess

slim, target = sys.argv[1:]
_, before, _ = load_net(target)  # the model it was fine-tuned from: its stored settings carry over
print(store_postprocess(slim, target, before.postprocess, before.tta), before.postprocess, "tta", before.tta)
EOF
