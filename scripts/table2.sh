#!/usr/bin/env bash
# Table 2: vanilla (argmax and generation protocols), QLoRA, the four paper baselines plus NPO,
# the two training-free baselines (instruction prompt, in-context unlearning) and SPUL on one
# dataset, with the settings chosen by scripts/select.sh where there are some, then the report. Overrides: MODEL DATASET DATA_ROOT DATA_DIR CAPS OUT SEEDS PROFILE ALPHA BETA ... (see
# scripts/common.sh). Example: DATASET=yelp DATA_ROOT=/data bash scripts/table2.sh
source "$(dirname "$0")/common.sh"

runs=()
for seed in $SEEDS; do
  vanilla_stage "$seed"
  qlora_stage "$seed"
  for method in $TRAINED_BASELINES $TRAINING_FREE; do baseline_stage "$seed" "$method"; done
  spul_stage "$seed" "spul-s$seed" --ptuning_num_tokens "$P_TOKENS"
  for r in vanilla vanilla-generate qlora $TRAINED_BASELINES $TRAINING_FREE spul; do runs+=("$OUT/$r-s$seed"); done
done
report table2 "${runs[@]}"
