#!/usr/bin/env bash
# Set everything up and run the main job: FLAME on the embedded SmolLM2-135M
# and Natural Instructions (configs/default.toml). Extra arguments go to
# `fedmole run`, e.g. `bash scripts/run.sh --set rounds=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/fedmole prepare
.venv/bin/fedmole run configs/default.toml "$@"
