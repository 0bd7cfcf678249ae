#!/usr/bin/env bash
# Create .venv in the repository root and install fedmole with the exact
# dependency versions of constraints.txt. Idempotent: a second run only
# checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))'; then
  echo "fedmole needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: an unpinned torch (or one pulled in by another
# package) brings several GB of CUDA libraries on Linux. constraints.txt holds
# the exact versions of every dependency (pyproject.toml has ranges only).
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,bench,flower,tensorboard]"
