#!/usr/bin/env bash
# Install moco with its test extras and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="$(bash scripts/install.sh test | tail -n 1)"
export MPLBACKEND=Agg
exec "$env_dir/bin/python" -m pytest "$@"
