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

# --- PostgreSQL: every database test also runs on a throwaway cluster the tests
# start themselves (tests/peers/postgres.py); here its absence is an error, not a skip.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then need_apt+=(postgresql); fi
export MRCT_REQUIRE_POSTGRES=1
# --- end PostgreSQL

if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# The virtual environment: the same install script the container images run (docker/Dockerfile).
EXTRAS=test,postgres bash scripts/install.sh

.venv/bin/ruff check dicom_node fusion_engine tests benchmarks scripts
.venv/bin/ruff format --check dicom_node fusion_engine tests benchmarks scripts
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
