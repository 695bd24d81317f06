#!/usr/bin/env bash
# Set everything up, then run the default job: LeNet-5 on Fashion-MNIST, compressed, with the six-ratio table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/netslim demo "$@"
