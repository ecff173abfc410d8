# Shared by the table/figure recipes: settings from the environment, stage runner, dry run.
#
# Every setting below can be overridden from the environment, e.g.
#   MODEL=facebook/opt-1.3b DATASET=sst2 DATA_ROOT=../shared/data bash scripts/table2.sh
# PROFILE=paper (default) uses the paper's hyperparameters (notes §4); PROFILE=cpu uses the
# CPU-scale caps, epochs and learning rates of the main job. `--dry-run` (or DRY_RUN=1)
# prints every command instead of running it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for a in "$@"; do [ "$a" = "--dry-run" ] && DRY_RUN=1; done
DRY_RUN=${DRY_RUN:-0}
PROFILE=${PROFILE:-paper}
if [ -z "${PY:-}" ]; then PY=.venv/bin/python; [ -x "$PY" ] || PY=python3; fi

if [ "$PROFILE" = cpu ]; then
  : "${MODEL:=smollm2-135m}" "${DATASET:=rt}"
  : "${CAPS:=--max_train_retain 128 --max_train_forget 64 --max_test_retain 128 --max_test_forget 64 --max_length 128}"
  : "${QLORA_EPOCHS:=4}" "${QLORA_LR:=1e-3}" "${QLORA_QUANT:=--no_quantize}"
  : "${SPUL_EPOCHS:=6}" "${SPUL_LR:=1e-2}" "${BASELINE_LR:=5e-5}" "${BATCH:=16}"
  # SPUL: batch 8 (twice the prompt updates of batch 16 for the same compute) and the exact
  # reference cache (later epochs skip the no-prompt forward; about 25% less time per step)
  : "${SPUL_BATCH:=8}" "${SPUL_FLAGS:=--cache_reference}"
elif [ "$PROFILE" = paper ]; then
  : "${MODEL:=meta-llama/Llama-2-7b-hf}" "${DATASET:=sst2}" "${CAPS:=}"
  case "$DATASET" in yelp) d_ep=2 ;; *) d_ep=10 ;; esac
  : "${QLORA_EPOCHS:=$d_ep}" "${QLORA_LR:=1e-4}" "${QLORA_QUANT:=}"
  : "${SPUL_EPOCHS:=10}" "${SPUL_LR:=1e-4}" "${BASELINE_LR:=1e-5}" "${BATCH:=32}"
  : "${SPUL_BATCH:=$BATCH}" "${SPUL_FLAGS:=}"
else
  echo "error: PROFILE=$PROFILE: use paper or cpu" >&2; exit 2
fi
: "${BASELINE_EPOCHS:=1}" "${SEEDS:=42}" "${P_TOKENS:=30}" "${ALPHA:=1}" "${BETA:=0.5}"
: "${OUT:=runs/$(basename "$MODEL")-$DATASET}"

DATA=(--dataset "$DATASET")
[ -n "${DATA_ROOT:-}" ] && DATA+=(--data_root "$DATA_ROOT")
[ -n "${DATA_DIR:-}" ] && DATA+=(--data_dir "$DATA_DIR")
# shellcheck disable=SC2206
DATA+=($CAPS)

# stage NAME RUN_DIR CMD...: run CMD unless RUN_DIR already holds a finished run
stage() {
  local name=$1 dir=$2; shift 2
  if [ "$DRY_RUN" = 1 ]; then printf '%s\n' "$*"; return; fi
  if [ -f "$dir/metrics.json" ]; then echo "[$name] reusing $dir"; return; fi
  echo "[$name] $(date +%H:%M:%S) $*"
  local t0=$SECONDS
  "$@" || { echo "error: stage '$name' failed (command above); later stages not run" >&2; exit 1; }
  echo "[$name] done in $((SECONDS - t0)) s"
}

# The shared stages; each takes the seed as $1.
vanilla_stage() {  # the pre-trained model, evaluated as it is
  stage "vanilla s$1" "$OUT/vanilla-s$1" $PY inference_spul.py --model_name "$MODEL" "${DATA[@]}" --seed "$1" --output_path "$OUT/vanilla-s$1"
}

qlora_stage() {  # the fine-tuned model every unlearning run starts from
  stage "qlora s$1" "$OUT/qlora-s$1" $PY qlora.py --model_name "$MODEL" "${DATA[@]}" --seed "$1" \
    --lr "$QLORA_LR" --num_epochs "$QLORA_EPOCHS" --train_batch_size "$BATCH" $QLORA_QUANT --output_path "$OUT/qlora-s$1"
}

spul_stage() {  # spul_stage SEED RUN_NAME [extra spul.py flags...]
  local seed=$1 name=$2; shift 2
  stage "$name" "$OUT/$name" $PY spul.py --model_checkpoints "$OUT/qlora-s$seed" "${DATA[@]}" --seed "$seed" \
    --lr "$SPUL_LR" --num_epochs "$SPUL_EPOCHS" --train_batch_size "$SPUL_BATCH" $SPUL_FLAGS "$@" --output_path "$OUT/$name"
}

report() {  # report NAME RUN_DIR...: markdown, CSV and plot next to the runs
  local name=$1; shift
  if [ "$DRY_RUN" = 1 ]; then printf '%s\n' "$PY -m utils.report $* --markdown $OUT/$name.md --csv $OUT/$name.csv --plot $OUT/$name.png"; return; fi
  $PY -m utils.report "$@" --markdown "$OUT/$name.md" --csv "$OUT/$name.csv" --plot "$OUT/$name.png"
  echo "plot: $OUT/$name.png"
}
