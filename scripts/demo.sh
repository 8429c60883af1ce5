#!/usr/bin/env bash
# Install moco and run its main job: `moco demo` (extra arguments are passed on, e.g. --dataset digits).
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir="$(bash scripts/install.sh | tail -n 1)"
exec "$env_dir/bin/moco" demo "$@"
