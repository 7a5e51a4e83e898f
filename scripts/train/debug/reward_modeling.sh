#!/usr/bin/env bash
# The embedded default: a tiny Llama trained offline on minrm's toy preference data (about a
# minute on 2 CPU cores). Extra flags are passed through, e.g. `--num_evals 4`.
set -euo pipefail
cd "$(dirname "$0")/../../.."
python -m minrm.train "$@"
