#!/usr/bin/env bash
# Everything only a GPU can show, in at most 8 minutes on one H100/H200, with the machine's own python3
# (scripts/gpu_check.py lists the parts and their budgets); installs the wheels of scripts/gpu_wheels.sh
# first and writes OUT/report.md and OUT/report.json (OUT: gpu_check).
#   bash scripts/gpu_check.sh [--out OUT] [--wheels DIR] [--dry_run]
# Exit status 1 when a part failed or ran out of time, or when nvidia-smi lists a GPU that torch does
# not see; without any GPU it checks that every command it would run exists.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m scripts.gpu_check "$@"
