#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M, Rotten Tomatoes 'rt' splits), CPU scale:
# fine-tune with QLoRA, evaluate the vanilla and the fine-tuned model on the four splits, print
# the table. Finished stages are reused on a second run (delete runs/main to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
OUT=${OUT:-runs/main}
# CPU-scale caps: every split capped (seeded, class-stratified), short reviews.
DATA=(--dataset rt --max_train_retain 192 --max_train_forget 64 --max_test_retain 192 --max_test_forget 64 --max_length 128 --seed 42)
echo "main job: about 8 minutes on 2 CPU cores (first run also converts the model, ~1 minute)"

stage() {  # stage NAME RUN_DIR COMMAND...: run unless RUN_DIR is already complete
  local name=$1 dir=$2; shift 2
  if [ -f "$dir/metrics.json" ]; then echo "[$name] reusing $dir"; return; fi
  echo "[$name] $*"
  "$@" || { echo "main job: stage '$name' failed" >&2; exit 1; }
}

stage vanilla "$OUT/vanilla" $PY inference_spul.py "${DATA[@]}" --output_path "$OUT/vanilla"
stage qlora "$OUT/qlora" $PY qlora.py "${DATA[@]}" --lr 1e-3 --num_epochs 3 --train_batch_size 16 --output_path "$OUT/qlora"
$PY -m utils.report "$OUT/vanilla" "$OUT/qlora" --names Vanilla QLoRA
