#!/usr/bin/env bash
# Everything `make test` needs beyond what the machine ships (gcc, make, Python 3.11, and
# optionally the CUDA toolkit): Python test packages from requirements-dev.txt. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import numpy, ml_dtypes, pytest" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
fi
