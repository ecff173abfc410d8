#!/usr/bin/env bash
# The main job: Table 2 at CPU scale on the embedded default (SmolLM2-135M, Rotten Tomatoes
# 'rt' splits): vanilla evaluation (argmax and generation protocols), QLoRA fine-tune, the six
# fine-tuning baselines, the three training-free baselines (in-context unlearning: the best of 4 drawn contexts on
# validation data) and SPUL (under the validation guard), with the hyperparameters
# scripts/select.sh chose on validation data (scripts/selected/cpu-rt.env), then the report
# (markdown table, CSV, trade-off plot). Finished stages are reused on a second run; delete
# runs/main to start over. Settings: PROFILE=cpu in scripts/common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "main job: Table 2 at CPU scale, about 95 minutes on a 2-core AMD EPYC (87 measured before the RL+GD stage, which adds about 8), of which SPUL 60 (seed 42 ends its first SPUL attempt on a hedge, so the validation guard trains it twice; SPUL_RESTARTS=0 skips the guard: about 48 minutes on the README's Xeon); 14 stages with the retrain oracle, settings from scripts/selected/cpu-rt.env; the first run also converts the model, ~1 minute"
# ONE_PROCESS=1 (utils/stages.py): the stages share one Python process, so the libraries load
# once (about 9 s per stage here); ONE_PROCESS=0 runs each stage as its own process
PROFILE=cpu OUT=${OUT:-runs/main} ONE_PROCESS=${ONE_PROCESS:-1} bash scripts/table2.sh "$@"
