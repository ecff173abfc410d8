# Shared by the table/figure recipes: settings from the environment, stage runner, dry run.
#
# Every setting below can be overridden from the environment, e.g.
#   MODEL=facebook/opt-1.3b DATASET=sst2 DATA_ROOT=../shared/data bash scripts/table2.sh
# PROFILE=paper (default) uses the paper's hyperparameters (notes §4); PROFILE=cpu uses the
# CPU-scale caps, epochs and learning rates of the main job. `--dry-run` (or DRY_RUN=1)
# prints every command instead of running it. THREADS=N passes --threads N to every stage.
#
# Hyperparameters chosen on validation data by scripts/select.sh are read from $SELECTED
# (default scripts/selected/<profile>-<dataset>.env, when it exists): SEL_SPUL and
# SEL_<BASELINE> hold each method's flags. A setting given in the environment (SPUL_LR,
# SPUL_EPOCHS, ALPHA, BETA, BASELINE_LR) still wins over the file.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

for a in "$@"; do [ "$a" = "--dry-run" ] && DRY_RUN=1; done
DRY_RUN=${DRY_RUN:-0}
PROFILE=${PROFILE:-paper}
# flags the user set in the environment; they override the selected settings
USER_SPUL=() USER_BASELINE=()
[ -n "${SPUL_LR:-}" ] && USER_SPUL+=(--lr "$SPUL_LR")
[ -n "${SPUL_EPOCHS:-}" ] && USER_SPUL+=(--num_epochs "$SPUL_EPOCHS")
[ -n "${ALPHA:-}" ] && USER_SPUL+=(--alpha "$ALPHA")
[ -n "${BETA:-}" ] && USER_SPUL+=(--beta "$BETA")
[ -n "${BASELINE_LR:-}" ] && USER_BASELINE+=(--lr "$BASELINE_LR")
if [ -z "${PY:-}" ]; then PY=.venv/bin/python; [ -x "$PY" ] || PY=python3; fi

if [ "$PROFILE" = cpu ]; then
  : "${MODEL:=smollm2-135m}" "${DATASET:=rt}"
  case "$DATASET" in wmdp_sciq) d_len=256 ;; *) d_len=128 ;; esac  # a question and its four options run longer than a review
  : "${CAPS:=--max_train_retain 128 --max_train_forget 64 --max_val_retain 128 --max_val_forget 64 --max_test_retain 128 --max_test_forget 64 --max_length $d_len}"
  : "${QLORA_EPOCHS:=4}" "${QLORA_LR:=1e-3}" "${QLORA_QUANT:=--no_quantize}"
  : "${SPUL_EPOCHS:=6}" "${SPUL_LR:=1e-2}" "${BASELINE_LR:=5e-5}" "${BATCH:=16}"
  # SPUL: batch 8 (twice the prompt updates of batch 16 for the same compute); spul.py's
  # default reference cache makes later epochs skip the no-prompt forward (about 25% less time per step)
  : "${SPUL_BATCH:=8}" "${SPUL_FLAGS:=}"
  # table2.sh's SPUL stage restarts a run once (seed + 1000) when its val forget ACC is above 15
  # (spul.py --restarts): at 16 epochs some seeds end on a hedge instead of the names (docs/experiments-cpu.md)
  : "${SPUL_RESTARTS:=1}" "${SPUL_RESTART_VAL_FORGET:=15}"
  # table2.sh's in-context baseline keeps the best of 4 seeded draws of its context on validation data
  # (baselines.py --icl_draws, the selection's criterion): one draw ranged 42-82% test retain over seeds
  : "${ICL_DRAWS:=4}"
elif [ "$PROFILE" = paper ]; then
  : "${MODEL:=meta-llama/Llama-2-7b-hf}" "${DATASET:=sst2}" "${CAPS:=}"
  case "$DATASET" in yelp) d_ep=2 ;; wmdp_sciq) d_ep=5 ;; *) d_ep=10 ;; esac  # QLoRA epochs (notes §4)
  : "${QLORA_EPOCHS:=$d_ep}" "${QLORA_LR:=1e-4}" "${QLORA_QUANT:=}"
  : "${SPUL_EPOCHS:=10}" "${SPUL_LR:=1e-4}" "${BASELINE_LR:=1e-5}" "${BATCH:=32}"
  : "${SPUL_BATCH:=$BATCH}" "${SPUL_FLAGS:=}" "${SPUL_RESTARTS:=0}" "${SPUL_RESTART_VAL_FORGET:=15}" "${ICL_DRAWS:=1}"
else
  echo "error: PROFILE=$PROFILE: use paper or cpu" >&2; exit 2
fi
: "${BASELINE_EPOCHS:=1}" "${SEEDS:=42}" "${P_TOKENS:=30}" "${ALPHA:=1}" "${BETA:=0.5}"
: "${OUT:=runs/$(basename "$MODEL")-$DATASET}"

: "${SELECTED:=scripts/selected/$PROFILE-$DATASET.env}"
if [ -f "$SELECTED" ]; then
  # shellcheck disable=SC1090
  source "$SELECTED"
else
  SELECTED=""  # no selection for this profile and dataset: the defaults above
fi

# spul.py's validation guard for table2.sh (SPUL_RESTARTS=0: off, the paper's single run); a bad
# value stops here, in one line, before any stage runs
[[ "$SPUL_RESTARTS" =~ ^[0-9]+$ ]] || { echo "error: SPUL_RESTARTS=$SPUL_RESTARTS: use a whole number >= 0" >&2; exit 2; }
[[ "$SPUL_RESTART_VAL_FORGET" =~ ^[0-9]+([.][0-9]+)?$ ]] && awk -v v="$SPUL_RESTART_VAL_FORGET" 'BEGIN{exit !(v <= 100)}' \
  || { echo "error: SPUL_RESTART_VAL_FORGET=$SPUL_RESTART_VAL_FORGET: use an ACC in [0, 100]" >&2; exit 2; }
GUARD=()
[ "$SPUL_RESTARTS" != 0 ] && GUARD=(--restarts "$SPUL_RESTARTS" --restart_val_forget "$SPUL_RESTART_VAL_FORGET")
# the in-context baseline's draws for table2.sh (ICL_DRAWS=1: one context drawn with the seed)
[[ "$ICL_DRAWS" =~ ^[1-9][0-9]*$ ]] || { echo "error: ICL_DRAWS=$ICL_DRAWS: use a whole number >= 1" >&2; exit 2; }
DRAWS=()
[ "$ICL_DRAWS" != 1 ] && DRAWS=(--icl_draws "$ICL_DRAWS")

# selected_flags METHOD: the flags scripts/select.sh chose for METHOD (empty when none)
selected_flags() { local v="SEL_${1^^}"; printf '%s' "${!v:-}"; }
# selected_run METHOD SEED: the run folder selection chose, if it was trained with this seed and
# no setting of the environment overrides the selection (empty otherwise)
selected_run() {
  local v="SELRUN_${1^^}"
  local overridden=${#USER_SPUL[@]}
  [ "$1" != spul ] && overridden=${#USER_BASELINE[@]}
  [ "$1" = spul ] && overridden=$(( overridden + ${#GUARD[@]} ))  # a guarded SPUL run may have to restart: trained again
  [ "${SEL_SEED:-}" = "$2" ] && [ "$overridden" = 0 ] && [ -n "${!v:-}" ] && [ -f "${!v}/metrics.json" -o "$DRY_RUN" = 1 ] && printf '%s' "${!v}"
  return 0
}

# eval_stage NAME RUN_DIR SEED: evaluate a finished run on every split (the selected run of the
# selection seed: chosen on validation data, then evaluated on test once)
eval_stage() {
  stage "$1" "$OUT/$1" $PY inference_spul.py --model_checkpoints "$2" "${DATA[@]}" --seed "$3" --output_path "$OUT/$1"
}

DATA=(--dataset "$DATASET")
[ -n "${THREADS:-}" ] && DATA+=(--threads "$THREADS")
[ -n "${DATA_ROOT:-}" ] && DATA+=(--data_root "$DATA_ROOT")
[ -n "${DATA_DIR:-}" ] && DATA+=(--data_dir "$DATA_DIR")
# shellcheck disable=SC2206
DATA+=($CAPS)

# stage NAME RUN_DIR CMD...: run CMD unless RUN_DIR already holds a finished run (its
# metrics.json; RUN_DIR may instead name the .json file that marks the stage as finished).
# ONE_PROCESS=1: the stage joins a plan instead, and the plan runs in one python process
# (utils/stages.py: the libraries load once) before the report, or when the recipe ends.
# A finished stage's command is recorded beside its folder (.<folder>.cmd), and a later run of a
# recipe reuses the folder only for the same command: a changed flag, selection, seed or thread
# count stops the recipe before anything runs, instead of reporting the old run's numbers under
# the new settings. Folders without a record (made before the records existed) are reused.
ONE_PROCESS=${ONE_PROCESS:-0}
PLAN=""
PLANNED_DIRS=() PLANNED_CMDS=()
stage() {
  local name=$1 dir=$2; shift 2
  if [ "$DRY_RUN" = 1 ]; then printf '%s\n' "$*"; return; fi
  if [ -f "$(done_marker "$dir")" ]; then check_reuse "$name" "$dir" "$*"; echo "[$name] reusing ${dir%/*.json}"; return; fi
  if [ "$ONE_PROCESS" = 1 ]; then plan_stage "$name" "$dir" "$@"; PLANNED_DIRS+=("$dir"); PLANNED_CMDS+=("$*"); return; fi
  echo "[$name] $(date +%H:%M:%S) $*"
  local t0=$SECONDS
  "$@" || { echo "error: stage '$name' failed (command above); later stages not run" >&2; exit 1; }
  record_stage "$dir" "$*"
  echo "[$name] done in $((SECONDS - t0)) s"
}

done_marker() { if [[ $1 == *.json ]]; then printf '%s' "$1"; else printf '%s/metrics.json' "$1"; fi; }
stage_record() { local t=${1%/*.json}; printf '%s/.%s.cmd' "$(dirname "$t")" "$(basename "$t")"; }
record_stage() { [ -f "$(done_marker "$1")" ] && printf '%s\n' "$2" > "$(stage_record "$1")"; return 0; }  # DIR CMD

check_reuse() {  # NAME DIR CMD: a finished folder is reused only by the command that made it
  local rec; rec=$(stage_record "$2")
  if [ -f "$rec" ] && [ "$(cat "$rec")" != "$3" ]; then
    echo "error: stage '$1': ${2%/*.json} was made by another command (recorded in $rec); delete it to rerun with the current settings, or set another OUT" >&2
    exit 2
  fi
}

plan_stage() {  # one record of the plan: NAME, RUN_DIR, CMD..., each followed by a NUL, then a newline
  if [ -z "$PLAN" ]; then
    PLAN=$(mktemp "${TMPDIR:-/tmp}/spul-plan.XXXXXX")
    trap 'plan_exit $?' EXIT
  fi
  printf '%s\0' "$@" >> "$PLAN"
  printf '\n' >> "$PLAN"
}

run_plan() {  # run the planned stages (ONE_PROCESS=1) and empty the plan; a no-op without one
  [ -n "$PLAN" ] && [ -s "$PLAN" ] || return 0
  local plan=$PLAN status=0 i
  $PY -m utils.stages "$plan" || status=$?
  for i in "${!PLANNED_DIRS[@]}"; do record_stage "${PLANNED_DIRS[$i]}" "${PLANNED_CMDS[$i]}"; done  # those that finished
  PLANNED_DIRS=() PLANNED_CMDS=()
  [ "$status" = 0 ] || { rm -f "$plan"; PLAN=""; exit 1; }
  : > "$plan"
}

plan_exit() {  # EXIT trap: the stages left in the plan run if the recipe itself ended well
  local status=$1
  trap - EXIT
  if [ "$status" = 0 ]; then run_plan; fi
  rm -f "$PLAN"
  exit "$status"
}

# The shared stages; each takes the seed as $1.
vanilla_stage() {  # the pre-trained model, evaluated as it is, under both protocols
  stage "vanilla s$1" "$OUT/vanilla-s$1" $PY inference_spul.py --model_name "$MODEL" "${DATA[@]}" --seed "$1" --output_path "$OUT/vanilla-s$1"
  stage "vanilla-generate s$1" "$OUT/vanilla-generate-s$1" $PY inference_spul.py --model_name "$MODEL" "${DATA[@]}" --seed "$1" \
    --protocol generate --output_path "$OUT/vanilla-generate-s$1"
}

qlora_stage() {  # the fine-tuned model every unlearning run starts from
  stage "qlora s$1" "$OUT/qlora-s$1" $PY qlora.py --model_name "$MODEL" "${DATA[@]}" --seed "$1" \
    --lr "$QLORA_LR" --num_epochs "$QLORA_EPOCHS" --train_batch_size "$BATCH" $QLORA_QUANT --output_path "$OUT/qlora-s$1"
}

retrain_stage() {  # the retrain oracle: the QLoRA recipe on train_retain only (never saw the forget set)
  stage "retrain s$1" "$OUT/retrain-s$1" $PY qlora.py --model_name "$MODEL" "${DATA[@]}" --seed "$1" --retain_only \
    --lr "$QLORA_LR" --num_epochs "$QLORA_EPOCHS" --train_batch_size "$BATCH" $QLORA_QUANT --output_path "$OUT/retrain-s$1"
}

spul_stage() {  # spul_stage SEED RUN_NAME [extra spul.py flags...]: defaults < selected < environment < extra
  local seed=$1 name=$2; shift 2
  # shellcheck disable=SC2046
  stage "$name" "$OUT/$name" $PY spul.py --model_checkpoints "$OUT/qlora-s$seed" "${DATA[@]}" --seed "$seed" \
    --lr "$SPUL_LR" --num_epochs "$SPUL_EPOCHS" --alpha "$ALPHA" --beta "$BETA" --train_batch_size "$SPUL_BATCH" $SPUL_FLAGS \
    $(selected_flags spul) "${USER_SPUL[@]}" "$@" --output_path "$OUT/$name"
}

baseline_stage() {  # baseline_stage SEED METHOD [RUN_NAME [extra baselines.py flags...]]
  local seed=$1 method=$2 name=${3:-$2-s$1}; shift $(( $# < 3 ? $# : 3 ))
  # shellcheck disable=SC2046
  stage "$method s$seed" "$OUT/$name" $PY baselines.py --model_checkpoints "$OUT/qlora-s$seed" "${DATA[@]}" \
    --seed "$seed" --unlearn_method "$method" --lr "$BASELINE_LR" --num_epochs "$BASELINE_EPOCHS" \
    --train_batch_size "$BATCH" $(selected_flags "$method") "${USER_BASELINE[@]}" "$@" --output_path "$OUT/$name"
}

report() {  # report NAME RUN_DIR...: markdown, CSV, trade-off plot and MIA plot next to the runs (and, with two
  # SEEDS or more, the seed spread and, when QLoRA is among the runs, each row's paired difference to it)
  local name=$1; shift
  local files=(--markdown "$OUT/$name.md" --csv "$OUT/$name.csv" --plot "$OUT/$name.png" --mia_plot "$OUT/$name-mia.png")
  local -a seeds; read -r -a seeds <<< "$SEEDS"
  if [ "${#seeds[@]}" -gt 1 ]; then
    files+=(--spread "$OUT/$name-spread.md")  # how each row's ACC spreads over the seeds
    local r
    for r in "$@"; do  # the model every unlearning run starts from: differences paired by seed, with an interval
      if [[ ${r##*/} =~ ^qlora-s[0-9]+$ ]]; then files+=(--paired qlora --paired_markdown "$OUT/$name-paired.md"); break; fi
    done
  fi
  if [ "$DRY_RUN" = 1 ]; then printf '%s\n' "$PY -m utils.report $* ${files[*]}"; return; fi
  run_plan
  $PY -m utils.report "$@" "${files[@]}"
  echo "plots: $OUT/$name.png $OUT/$name-mia.png"
}

TRAINED_BASELINES="gradient_ascent random_label random_label_descent gradient_ascent_kl gradient_ascent_descent npo"
TRAINING_FREE="instruction_prompt in_context name_filter"
