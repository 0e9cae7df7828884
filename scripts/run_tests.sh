#!/usr/bin/env bash
# Run the test suite; napari's viewer tests get a virtual screen when there is no display.
set -euo pipefail
cd "$(dirname "$0")/.."
export QT_API=pyside6
if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
  exec xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest "$@"
