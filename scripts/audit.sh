#!/usr/bin/env bash
# The forgetting audit on the runs of a table recipe (default: the main job's, runs/main):
# - the relearning attack (python -m utils.relearn): LoRA fine-tuning on the forget examples of a
#   seeded quarter of the forgotten names, 10/25/50 steps, accuracy on the other names' forget
#   examples (train and test side) and on test retain; SPUL keeps its prompt attached and frozen;
#   then its control (--attack_data retain): as many train_retain examples naming nobody, the
#   same held-out examples (does any fine-tuning undo the forgetting, or only relearning?);
# - the robustness probes (python -m utils.probes): three paraphrased questions, three surface
#   changes of the forgotten names, prompt removal; each on the four paper splits.
# Audited: SPUL, the baseline that the selection criterion picks among Table 2's baselines
# (python -m utils.select --best: validation and train_forget only), and, for the relearning
# attack, the retrain oracle (how fast a model that never saw the forget set learns it).
# Overrides: OUT SEEDS PROFILE (as the table recipes), AUDIT_BASELINE (a run folder),
# RELEARN_LR (default: the QLoRA recipe's learning rate), RELEARN_STEPS ("10 25 50").
# Example: bash scripts/audit.sh   (after bash scripts/main.sh; about 20 minutes on 2 CPU cores
# before the control was added, which repeats the attack: about 35 minutes, estimated)
: "${PROFILE:=cpu}" "${OUT:=runs/main}"  # the main job's runs unless told otherwise
source "$(dirname "$0")/common.sh"

seed=${SEEDS%% *}
: "${RELEARN_LR:=$QLORA_LR}" "${RELEARN_STEPS:=10 25 50}"
AUDIT=$OUT/audit-s$seed

# trained_run DIR: the run an eval folder evaluated (table2.sh evaluates the selection's own runs),
# else DIR itself
trained_run() { $PY -c 'import sys; from utils.runs import trained_run; print(trained_run(sys.argv[1]))' "$1"; }

if [ "$DRY_RUN" = 1 ]; then
  spul=$OUT/spul-s$seed best=${AUDIT_BASELINE:-'$(best baseline)'} oracle=$OUT/retrain-s$seed
else
  for r in spul qlora retrain $TRAINED_BASELINES $TRAINING_FREE; do
    [ -f "$OUT/$r-s$seed/metrics.json" ] || { echo "error: $OUT/$r-s$seed: not a finished run (run the table recipe first, e.g. bash scripts/main.sh)" >&2; exit 2; }
  done
  spul=$(trained_run "$OUT/spul-s$seed") oracle=$OUT/retrain-s$seed
  if [ -z "${AUDIT_BASELINE:-}" ]; then
    baselines=()
    for m in $TRAINED_BASELINES $TRAINING_FREE; do baselines+=("$OUT/$m-s$seed"); done
    AUDIT_BASELINE=$($PY -m utils.select --reference "$OUT/qlora-s$seed" --runs "${baselines[@]}" --best)
  fi
  best=$AUDIT_BASELINE
  echo "audit: SPUL $spul, baseline $best (selection criterion), oracle $oracle"
fi

# shellcheck disable=SC2086
stage "relearn s$seed" "$AUDIT/relearn/relearn.json" $PY -m utils.relearn "$spul" "$best" "$oracle" "${DATA[@]}" \
  --seed "$seed" --steps $RELEARN_STEPS --lr "$RELEARN_LR" --names SPUL "$(basename "$best")" Retrain --output_path "$AUDIT/relearn"
# shellcheck disable=SC2086
stage "relearn control s$seed" "$AUDIT/relearn-control/relearn.json" $PY -m utils.relearn "$spul" "$best" "$oracle" "${DATA[@]}" \
  --seed "$seed" --steps $RELEARN_STEPS --lr "$RELEARN_LR" --attack_data retain --names SPUL "$(basename "$best")" Retrain \
  --output_path "$AUDIT/relearn-control"
stage "probes s$seed" "$AUDIT/probes/probes.json" $PY -m utils.probes "$spul" "$best" "${DATA[@]}" --seed "$seed" \
  --names SPUL "$(basename "$best")" --output_path "$AUDIT/probes"
if [ "$DRY_RUN" != 1 ]; then
  echo "relearning attack: $AUDIT/relearn/relearn.md (plot: relearn.png); its control: $AUDIT/relearn-control/relearn.md"
  echo "robustness probes: $AUDIT/probes/probes.md"
fi
