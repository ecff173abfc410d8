#!/usr/bin/env bash
# The main job: Table 2 at CPU scale on the embedded default (SmolLM2-135M, Rotten Tomatoes
# 'rt' splits): vanilla evaluation (argmax and generation protocols), QLoRA fine-tune, the five
# fine-tuning baselines, the three training-free baselines and SPUL, with the hyperparameters
# scripts/select.sh chose on validation data (scripts/selected/cpu-rt.env), then the report
# (markdown table, CSV, trade-off plot). Finished stages are reused on a second run; delete
# runs/main to start over. Settings: PROFILE=cpu in scripts/common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "main job: Table 2 at CPU scale, about 48 minutes on the 2-core Intel Xeon of the README's figures, other CPUs differ (13 stages with the retrain oracle, settings from scripts/selected/cpu-rt.env; the first run also converts the model, ~1 minute)"
# ONE_PROCESS=1 (utils/stages.py): the stages share one Python process, so the libraries load
# once (about 9 s per stage here); ONE_PROCESS=0 runs each stage as its own process
PROFILE=cpu OUT=${OUT:-runs/main} ONE_PROCESS=${ONE_PROCESS:-1} bash scripts/table2.sh "$@"
