#!/usr/bin/env bash
# The main job: Table 2 at CPU scale on the embedded default (SmolLM2-135M, Rotten Tomatoes
# 'rt' splits): vanilla evaluation, QLoRA fine-tune, the five fine-tuning baselines and SPUL,
# then the report (markdown table, CSV, trade-off plot). Finished stages are reused on a
# second run; delete runs/main to start over. Settings: PROFILE=cpu in scripts/common.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "main job: Table 2 at CPU scale, about 25 minutes on 2 CPU cores (8 stages; the first run also converts the model, ~1 minute)"
PROFILE=cpu OUT=${OUT:-runs/main} bash scripts/table2.sh "$@"
