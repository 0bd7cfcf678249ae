#!/usr/bin/env bash
# Set everything up and run the tests: the fast suite on tiny random models,
# then the few tests marked slow that use the real embedded model and data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fedmole prepare
.venv/bin/python -m pytest -q "$@"
.venv/bin/python -m pytest -q -m slow "$@"
