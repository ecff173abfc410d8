#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export SPUL_SHARED_DATA=${SPUL_SHARED_DATA:-$(cd .. && pwd)/shared/data}
exec .venv/bin/python -m pytest -q tests "$@"
