#!/usr/bin/env bash
# Sets clipline up on a fresh Debian machine with Python 3.11 (idempotent; run as root for
# the apt steps, or without apt on other systems: the data packages are then skipped and the
# demo falls back to generated data).
#   - apt: the real offline data the demo and tests use (Noto Color Emoji + Unicode emoji
#     names, Fashion-MNIST) and python3-venv where the venv module is missing
#   - .venv/ with torch 2.14.1 (served from local disk on the project's machines) and
#     clipline itself, editable, with its test tools and the peers the benchmarks compare to
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3

APT_PACKAGES=(fonts-noto-color-emoji unicode-data dataset-fashion-mnist)
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  if ! dpkg -s "${APT_PACKAGES[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT_PACKAGES[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    fi
    "$PY" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test,peers]"
