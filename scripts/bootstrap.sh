#!/usr/bin/env bash
# Installs what is missing, idempotently: a virtual environment in .venv with the project's pinned
# packages (CPU build of vLLM), and a Chromium for BrowserGym. Called by `make run` and `make test`;
# safe to call again (a stamp file skips pip when pyproject.toml has not changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${BGRPO_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.bgrpo-installed"
want=$(sha256sum pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[bootstrap] installing Python packages (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[cpu,dev,trackers]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to import beside the CPU
  # torch, and transformers imports torchvision whenever it is present. The project does not need
  # them (images go through the PIL image processors), so they are removed.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  echo "$want" > "$stamp"
fi

# Chromium: Playwright's own download if one is there, else Debian's package.
if ls "${PLAYWRIGHT_BROWSERS_PATH:-$HOME/.cache/ms-playwright}"/chromium-*/chrome-linux/chrome >/dev/null 2>&1; then
  :
elif [ -n "${BGRPO_CHROMIUM:-}" ] && [ -x "${BGRPO_CHROMIUM}" ]; then
  :
elif [ ! -x /usr/lib/chromium/chromium ]; then
  echo "[bootstrap] installing Debian chromium"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
