#!/usr/bin/env bash
# Creates .venv (once) with trb_jax and its test extras, CPU wheels only.
# Idempotent: a second call with an up-to-date venv only checks the stamp.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TRB_VENV:-$root/.venv}"
stamp="$venv/.trb_jax_stamp"
want="$(cat "$root/pyproject.toml" "$root/constraints-ci.txt" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
# constraints-ci.txt pins torch==2.13.0 (the CPU wheel); an unpinned torch pulls a CUDA build.
"$venv/bin/python" -m pip install -q -c "$root/constraints-ci.txt" -e "$root[test]"
echo "$want" > "$stamp"
