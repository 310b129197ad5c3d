#!/usr/bin/env bash
# Installs libtorch (pip torch==2.11.0, the build tch 0.24 expects; it runs on CPU too) into a
# cache outside the repository, reused when present, and links it at .libtorch, where
# .cargo/config.toml points tch. After this, plain `cargo build/test/bench` work.
#   STOWAGE_CACHE: the cache directory (default ~/.cache/stowage).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${STOWAGE_CACHE:-$HOME/.cache/stowage}"
venv="$cache/torch-venv"
want=2.11.0
py="$venv/bin/python"
have() { "$py" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$want' else 1)" 2>/dev/null; }
if ! have; then
  echo "setup: installing torch==$want into $venv (about 4.6 GB, once)" >&2
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$want"
  have || { echo "setup: torch $want did not install into $venv" >&2; exit 1; }
fi
torch_dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))' 2>/dev/null)"
ln -sfn "$torch_dir" "$repo/.libtorch"
echo "setup: libtorch $want at $torch_dir (linked as .libtorch)" >&2
