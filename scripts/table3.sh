#!/usr/bin/env bash
# Table 3: SPUL over alpha in {0.1, 0.5, 1} x beta in {0, 0.1, 0.5, 1} (p=30).
# Override the grid with ALPHAS="..." BETAS="...".
source "$(dirname "$0")/common.sh"
: "${ALPHAS:=0.1 0.5 1}" "${BETAS:=0 0.1 0.5 1}"
runs=()
for seed in $SEEDS; do
  qlora_stage "$seed"
  runs+=("$OUT/qlora-s$seed")
  for a in $ALPHAS; do for b in $BETAS; do
    spul_stage "$seed" "spul-a$a-b$b-s$seed" --alpha "$a" --beta "$b" --ptuning_num_tokens "$P_TOKENS"
    runs+=("$OUT/spul-a$a-b$b-s$seed")
  done; done
done
report table3 "${runs[@]}"
