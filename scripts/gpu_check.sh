#!/usr/bin/env bash
# One-GPU check of the CUDA paths at the paper's model shapes (SmolLM2-135M, OPT-1.3B,
# LLaMA-2-7B built in code with random weights; no hub or registry access needed): QLoRA
# (4-bit NF4), SPUL, GA+GD and inference, a few steps each; prints one markdown table
# (median step time, tokens/s, peak memory, status) and writes JSON. About 8 minutes on one GPU.
#
#   bash scripts/gpu_check.sh                                   # every model and cell
#   bash scripts/gpu_check.sh --models opt-1.3b --steps 5 --out runs/gpu_check-opt.json
#   bash scripts/gpu_check.sh --dry-run                         # print the command only (or DRY_RUN=1)
#   bash scripts/gpu_check.sh --dry_run                         # the module's plan: parameter counts, GA+GD estimates
#
# Every other flag goes to `python -m utils.gpu_check` (see its --help). PY picks the
# interpreter (default: .venv/bin/python when it exists, else python3), as scripts/common.sh does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DRY_RUN=${DRY_RUN:-0}
args=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY_RUN=1; else args+=("$a"); fi
done
if [ -z "${PY:-}" ]; then PY=.venv/bin/python; [ -x "$PY" ] || PY=python3; fi
cmd=("$PY" -m utils.gpu_check ${args[@]+"${args[@]}"})

if [ "$DRY_RUN" = 1 ]; then
  printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; printf '\n'
  exit 0
fi
exec "${cmd[@]}"
