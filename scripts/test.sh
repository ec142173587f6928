#!/usr/bin/env bash
# Install the test dependencies (Debian packages, a virtual environment) and run the whole suite:
# lint, strict typing, then pytest. This is the README's test command and what CI runs.
# Debian's chromium is the browser of the console's Playwright tests (never `playwright install`).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools openssl:openssl chromium:chromium; do
  bin=${pair%%:*}; pkg=${pair##*:}
  if [ ! -x "/usr/bin/$bin" ] && [ ! -x "/usr/sbin/$bin" ]; then need_apt+=("$pkg"); fi
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# A CPU build of torch lies in /opt/wheels on the project's machines: install it before the
# project so pip does not fetch a multi-GB CUDA build.
[ -d /opt/wheels ] && export PIP_FIND_LINKS="/opt/wheels ${PIP_FIND_LINKS:-}"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/ruff check dicom_node fusion_engine tests benchmarks scripts
.venv/bin/ruff format --check dicom_node fusion_engine tests benchmarks scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
