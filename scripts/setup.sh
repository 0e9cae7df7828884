#!/usr/bin/env bash
# Set up napari-stofm in ./.venv on a fresh Debian/Ubuntu machine.
#
#   bash scripts/setup.sh          the library, CLI and napari plugin
#   bash scripts/setup.sh --test   the same plus the test tools, and the virtual screen
#                                  (Xvfb + Mesa) the napari tests need
#
# Torch is installed first as the CPU build (a GPU build is only needed for CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="all"
system_gui=0
for arg in "$@"; do
  case "$arg" in
    --test) extras="test"; system_gui=1 ;;
    *) echo "unknown option $arg" >&2; exit 2 ;;
  esac
done

if [ "$system_gui" = 1 ] && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  # Qt 6 xcb platform + Mesa OpenGL for napari's canvas, and a virtual X server.
  pkgs="xvfb xauth libgl1 libegl1 libgl1-mesa-dri libglx-mesa0 libxkbcommon-x11-0 libxcb-cursor0 \
libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 \
libxcb-xinerama0 libxcb-xfixes0 libxcb-xkb1 libdbus-1-3 libfontconfig1 libglib2.0-0"
  missing=""
  for p in $pkgs; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  if [ -n "$missing" ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
fi

python=""
for candidate in python3.11 python3.12 python3.10 python3; do
  if command -v "$candidate" >/dev/null 2>&1; then python="$candidate"; break; fi
done
[ -n "$python" ] || { echo "Python 3.10+ is needed" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip show torch >/dev/null 2>&1 || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$extras]"
echo "napari-stofm is set up in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
