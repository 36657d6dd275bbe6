#!/usr/bin/env bash
# Fresh machine -> .venv with the pinned CPU set and this project (editable). Re-running is cheap.
# GPU machines: install the project with `pip install -e .[cuda,deepspeed]` into an env that has CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${BINDWEAVE_VENV:-.venv}
[ "${BINDWEAVE_FRESH_VENV:-0}" = 1 ] && rm -rf "$venv"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.bindweave-requirements"
if ! cmp -s .ci/requirements.txt "$stamp"; then
  "$venv/bin/pip" install -q --upgrade pip
  # DS_BUILD_OPS=0: deepspeed's sdist installs as pure python (its ops are JIT-built only when used).
  DS_BUILD_OPS=0 "$venv/bin/pip" install -q -r .ci/requirements.txt
  "$venv/bin/pip" install -q --no-deps -e .
  cp .ci/requirements.txt "$stamp"
fi
