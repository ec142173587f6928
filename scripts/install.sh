#!/usr/bin/env bash
# Install dicom-node into a virtual environment: pip, the torch build, the project and its extras.
# This is the one install step of the test command (scripts/test.sh, what CI runs) and of the
# container images (docker/Dockerfile): an image is built by exactly the steps CI exercises.
#
# Settings (environment variables):
#   VENV=.venv             the virtual environment (created when missing)
#   EXTRAS=test,postgres   project extras to install ('' for none; images: postgres)
#   EDITABLE=1             1: editable install of this checkout (development and CI);
#                          0: a regular install, the checkout can be deleted afterwards (images)
#   TORCH_VERSION=2.13.0   the torch release every environment runs
#   TORCH_INDEX_URL=       where torch comes from; empty: the configured pip indexes (on the
#                          project's machines /opt/wheels holds the CPU build). Images pass
#                          https://download.pytorch.org/whl/cpu or a CUDA index
#                          (https://download.pytorch.org/whl/cu128) so pip never picks a
#                          multi-GB CUDA build by accident, or the CPU build for a GPU worker.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
EXTRAS=${EXTRAS-test,postgres}
EDITABLE=${EDITABLE:-1}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
PY=${PYTHON:-python3}

# A CPU build of torch lies in /opt/wheels on the project's machines: install it before the
# project so pip does not fetch a multi-GB CUDA build.
if [ -d /opt/wheels ]; then export PIP_FIND_LINKS="/opt/wheels ${PIP_FIND_LINKS:-}"; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
"${pip[@]}" --upgrade pip
if [ -n "$TORCH_INDEX_URL" ]; then
  "${pip[@]}" --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
else
  "${pip[@]}" "torch==$TORCH_VERSION"
fi
spec="."
if [ -n "$EXTRAS" ]; then spec=".[$EXTRAS]"; fi
if [ "$EDITABLE" = 1 ]; then
  "${pip[@]}" -e "$spec"
else
  "${pip[@]}" --no-cache-dir "$spec"
fi
# The shipped fusion weights must be installed and intact (sha256 against their manifest).
"$VENV/bin/python" -c "from fusion_engine.inference import load_state_dict; load_state_dict()"
