#!/usr/bin/env bash
# Set up netslim on a fresh machine: a virtual environment in .venv with torch, torchvision and netslim,
# and Fashion-MNIST from Debian's package when it is missing. Safe to run again (it skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${NETSLIM_TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  # shellcheck disable=SC2086
  .venv/bin/pip install --quiet $TORCH_SPEC 2> >(grep -v "^WARNING: Location" >&2)
fi
echo "setup: installing netslim and its test dependencies"
.venv/bin/pip install --quiet -e ".[test]" 2> >(grep -v "^WARNING: Location" >&2)

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${NETSLIM_DATA:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    $SUDO apt-get update -qq >/dev/null && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "setup: warning: could not install dataset-fashion-mnist; netslim demo will say where it looked"
  else
    echo "setup: warning: no apt-get; put Fashion-MNIST's IDX files under \$NETSLIM_DATA/fashion-mnist"
  fi
fi
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
