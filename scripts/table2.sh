#!/usr/bin/env bash
# Table 2: vanilla (argmax and generation protocols), QLoRA, the retrain oracle (QLoRA on
# train_retain only: the reference of the audit columns), the four paper baselines plus NPO,
# the three training-free baselines (instruction prompt, in-context unlearning, name filter) and SPUL on one
# dataset, with the settings chosen by scripts/select.sh where there are some, then the report.
# The run selection chose for its seed is evaluated on every split instead of being trained
# again. Overrides: MODEL DATASET DATA_ROOT DATA_DIR CAPS OUT SEEDS PROFILE ALPHA BETA ... (see
# scripts/common.sh). Example: DATASET=yelp DATA_ROOT=/data bash scripts/table2.sh
source "$(dirname "$0")/common.sh"

runs=()
first=${SEEDS%% *}
if [ "${VANILLA:-1}" != 0 ]; then  # VANILLA=0 leaves the vanilla rows out
  vanilla_stage "$first"  # the pre-trained model: the training seed changes nothing (the data is fixed by --data_seed)
  runs+=("$OUT/vanilla-s$first" "$OUT/vanilla-generate-s$first")
fi
for seed in $SEEDS; do
  qlora_stage "$seed"
  retrain_stage "$seed"
  for method in $TRAINED_BASELINES $TRAINING_FREE spul; do
    chosen=$(selected_run "$method" "$seed")
    if [ -n "$chosen" ]; then eval_stage "$method-s$seed" "$chosen" "$seed"
    elif [ "$method" = spul ]; then spul_stage "$seed" "spul-s$seed" --ptuning_num_tokens "$P_TOKENS" "${GUARD[@]}"
    elif [ "$method" = in_context ]; then baseline_stage "$seed" in_context "in_context-s$seed" "${DRAWS[@]}"
    else baseline_stage "$seed" "$method"; fi
  done
  for r in qlora retrain $TRAINED_BASELINES $TRAINING_FREE spul; do runs+=("$OUT/$r-s$seed"); done
done
report table2 "${runs[@]}"
