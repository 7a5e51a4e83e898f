#!/usr/bin/env bash
# Everything only a GPU can show, in at most 8 minutes on one H100/H200 (scripts/gpu_check.py lists
# the parts and their budgets); writes OUT/report.md and OUT/report.json (OUT: gpu_check).
#   bash scripts/gpu_check.sh [--out OUT]
# Without a GPU it checks that every command it would run exists, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m scripts.gpu_check "$@"
