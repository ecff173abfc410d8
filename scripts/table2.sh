#!/usr/bin/env bash
# Table 2: vanilla, QLoRA, the four paper baselines plus NPO, and SPUL on one dataset, then the
# report. Overrides: MODEL DATASET DATA_ROOT DATA_DIR CAPS OUT SEEDS PROFILE ALPHA BETA ... (see
# scripts/common.sh). Example: DATASET=yelp DATA_ROOT=/data bash scripts/table2.sh
source "$(dirname "$0")/common.sh"

runs=()
for seed in $SEEDS; do
  vanilla_stage "$seed"
  qlora_stage "$seed"
  for method in gradient_ascent random_label gradient_ascent_kl gradient_ascent_descent npo; do
    stage "$method s$seed" "$OUT/$method-s$seed" $PY baselines.py --model_checkpoints "$OUT/qlora-s$seed" "${DATA[@]}" \
      --seed "$seed" --unlearn_method "$method" --lr "$BASELINE_LR" --num_epochs "$BASELINE_EPOCHS" \
      --train_batch_size "$BATCH" --output_path "$OUT/$method-s$seed"
  done
  spul_stage "$seed" "spul-s$seed" --alpha "$ALPHA" --beta "$BETA" --ptuning_num_tokens "$P_TOKENS"
  for r in vanilla qlora gradient_ascent random_label gradient_ascent_kl gradient_ascent_descent npo spul; do runs+=("$OUT/$r-s$seed"); done
done
report table2 "${runs[@]}"
