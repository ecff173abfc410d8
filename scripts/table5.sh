#!/usr/bin/env bash
# Table 5: QLoRA then SPUL (alpha = beta = 1, p = 30) on other models, one output folder each.
# MODELS="facebook/opt-1.3b meta-llama/Llama-2-13b-hf" by default (the paper's).
source "$(dirname "$0")/common.sh"
: "${MODELS:=facebook/opt-1.3b meta-llama/Llama-2-13b-hf}"
root=$OUT
runs=()
for MODEL in $MODELS; do
  OUT="$root/$(basename "$MODEL")"
  for seed in $SEEDS; do
    qlora_stage "$seed"
    spul_stage "$seed" "spul-s$seed" --alpha 1 --beta 1 --ptuning_num_tokens "$P_TOKENS"
    runs+=("$OUT/qlora-s$seed" "$OUT/spul-s$seed")
  done
done
OUT=$root
report table5 "${runs[@]}"
