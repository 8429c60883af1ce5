#!/usr/bin/env bash
# Install moco (editable) into the active virtualenv, or into ./.venv, which is created if missing.
#   bash scripts/install.sh          # moco and its runtime dependencies
#   bash scripts/install.sh test     # ... plus the test extras
# torch is installed first and pinned to the CPU build 2.13.0: an open range would pull several GB of
# CUDA wheels. Idempotent: a second run with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ -n "${VIRTUAL_ENV:-}" ]; then
  env_dir="$VIRTUAL_ENV"
else
  env_dir="$PWD/.venv"
  [ -x "$env_dir/bin/python" ] || "${PYTHON:-python3}" -m venv "$env_dir"
fi
py="$env_dir/bin/python"
pip_q=(-m pip install --quiet --disable-pip-version-check)
if ! "$py" -c 'import importlib.metadata as m, sys; sys.exit(m.version("torch").split("+")[0] != "2.13.0")' 2>/dev/null; then
  echo "installing torch==2.13.0 (CPU) into $env_dir" >&2
  "$py" "${pip_q[@]}" torch==2.13.0 2> >(grep -v "is ignored: it is neither" >&2)
fi
stamp="$env_dir/.moco-install-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)-${extras:-base}"
if [ ! -f "$stamp" ] || ! "$py" -c 'import moco' 2>/dev/null; then
  echo "installing moco${extras:+[$extras]} into $env_dir" >&2
  "$py" "${pip_q[@]}" -e ".${extras:+[$extras]}" 2> >(grep -v "is ignored: it is neither" >&2)
  rm -f "$env_dir"/.moco-install-*-"${extras:-base}"
  touch "$stamp"
fi
echo "$env_dir"
