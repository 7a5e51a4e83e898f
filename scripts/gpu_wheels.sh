#!/usr/bin/env bash
# The wheels the lent GPU machine's image lacks (scripts/gpu_wheels.py lists them and why), for its
# Python 3.12 on x86-64 Linux; run here, where the package index is. Fails over 60 MiB.
#   bash scripts/gpu_wheels.sh [DIR] [--dry_run]     # DIR: .gpu_wheels
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m scripts.gpu_wheels "$@"
