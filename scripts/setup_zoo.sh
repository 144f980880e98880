#!/usr/bin/env bash
# Idempotent set-up of the second environment for the model-zoo tests: .venv-zoo with
# torch==2.14.1 + torchvision==0.29.1 (torchvision does not load beside the CPU wheel of
# the main environment) + timm, then this project. Usage: bash scripts/setup_zoo.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
venv="$root/.venv-zoo"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
stamp="$venv/.renorm-fx-installed"
want="$( (cat "$root/pyproject.toml"; echo torch==2.14.1 torchvision==0.29.1 timm) | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "timm" "torch==2.14.1" "torchvision==0.29.1"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[test,deploy]" "torch==2.14.1"
  echo "$want" > "$stamp"
fi
