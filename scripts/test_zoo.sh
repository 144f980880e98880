#!/usr/bin/env bash
# Run the model-zoo test suite (torchvision + timm architectures) in its own environment,
# .venv-zoo (torch 2.14.1 + torchvision 0.29.1 + timm; sets itself up first, idempotent).
# Usage: bash scripts/test_zoo.sh [pytest args]   (-s also shows each model's fold counts)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_zoo.sh"
cd "$root"
exec .venv-zoo/bin/python -m pytest -q tests_zoo "$@"
