#!/usr/bin/env bash
# Run the whole test suite on a fresh machine (sets itself up first, idempotent):
#   1. tests/      in .venv      (torch 2.13.0, CPU wheel)
#   2. tests_zoo/  in .venv-zoo  (torch 2.14.1 + torchvision + timm: real architectures)
# With arguments, runs only the first suite with them: bash scripts/test.sh tests/test_api.py -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" test,deploy,demo
cd "$root"
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
.venv/bin/python -m pytest -q
bash "$root/scripts/test_zoo.sh"
