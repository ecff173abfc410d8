#!/usr/bin/env bash
# Figure 2: SPUL with p in {10, 20, 30, 40, 50} soft-prompt tokens (alpha = 1, beta = 0.5).
source "$(dirname "$0")/common.sh"
: "${P_SWEEP:=10 20 30 40 50}"
runs=()
for seed in $SEEDS; do
  qlora_stage "$seed"
  for p in $P_SWEEP; do
    spul_stage "$seed" "spul-p$p-s$seed" --ptuning_num_tokens "$p"
    runs+=("$OUT/spul-p$p-s$seed")
  done
done
report fig2 "${runs[@]}"
