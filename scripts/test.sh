#!/usr/bin/env bash
# Run the whole test suite on a fresh machine (sets itself up first).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh" test,deploy,demo
cd "$root"
exec .venv/bin/python -m pytest -q "$@"
