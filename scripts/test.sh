#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit + integration on ../shared).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
