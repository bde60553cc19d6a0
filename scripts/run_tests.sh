#!/usr/bin/env bash
# Set up (once) and run the whole test suite on CPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${TRB_VENV:-$root/.venv}"
cd "$root"
export JAX_PLATFORMS=cpu
exec "$venv/bin/python" -m pytest -n 2 -q "$@"
