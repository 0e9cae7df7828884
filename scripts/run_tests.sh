#!/usr/bin/env bash
# The test suite; napari's viewer tests get a virtual screen when there is no display.
# A full run (no arguments) first lints with ruff (configured in pyproject.toml); with
# arguments they go to pytest and the lint is left out.
set -euo pipefail
cd "$(dirname "$0")/.."
export QT_API=pyside6
if [ "$#" -eq 0 ]; then
  if [ -x .venv/bin/ruff ]; then
    .venv/bin/ruff check napari_stofm tests benchmarks scripts
  else
    echo "ruff is not installed (bash scripts/setup.sh --test installs it): lint skipped" >&2
  fi
fi
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"
