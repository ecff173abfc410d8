#!/usr/bin/env bash
# Table 4: SPUL with --forget_size 0.25, 0.5 and 1.0 (alpha = beta = 1, p = 30).
source "$(dirname "$0")/common.sh"
: "${FORGET_SIZES:=0.25 0.5 1.0}"
runs=()
for seed in $SEEDS; do
  qlora_stage "$seed"
  for tau in $FORGET_SIZES; do
    spul_stage "$seed" "spul-tau$tau-s$seed" --forget_size "$tau" --alpha 1 --beta 1 --ptuning_num_tokens "$P_TOKENS"
    runs+=("$OUT/spul-tau$tau-s$seed")
  done
done
report table4 "${runs[@]}"
