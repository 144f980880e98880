#!/usr/bin/env bash
# Idempotent set-up: a venv in .venv, torch==2.13.0 (CPU wheel) first, then the project.
# Usage: bash scripts/setup.sh [extras]    (extras default: test,deploy,demo)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-test,deploy,demo}"
py="${PYTHON:-python3}"
[ -x "$root/.venv/bin/python" ] || "$py" -m venv "$root/.venv"
venv_py="$root/.venv/bin/python"
stamp="$root/.venv/.renorm-fx-installed-$extras"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv_py" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
  "$venv_py" -m pip install --quiet --disable-pip-version-check -e "$root[$extras]"
  echo "$want" > "$stamp"
fi
