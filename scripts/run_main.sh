#!/usr/bin/env bash
# Set up (once) and run the main job on the embedded default, CPU only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${TRB_VENV:-$root/.venv}"
cd "$root"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec "$venv/bin/python" -m trb_jax.toy.demo "$@"
