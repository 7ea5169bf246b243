#!/usr/bin/env bash
# The GPU check, in one go, on a machine with one H100 / H200 (see bench/gpu_check.py for what it measures):
#
#   bash bench/gpu_check.sh [OUT.json]        # default OUT: gpu_check.json in the current directory
#
# Installs this repository (editable; with --no-deps when jax is already importable, so the image's CUDA
# jax is not replaced), then runs `python -m bench.gpu_check --out=OUT`, which writes ONE JSON with every
# figure (rewritten as each part finishes) and prints a short summary. Everything stays under 10 minutes
# on an H100: the Python side keeps to its own time budget and is stopped at 590 s from here regardless.
#
# Environment: PYTHON (default python3, else python); WHEELS, a folder of wheels for packages the image
# lacks (e.g. ml-collections, grain), installed first with --no-index --no-deps (default ./.whl if present);
# GPU_CHECK_ARGS, extra arguments for bench.gpu_check (e.g. "--combos=cudnn:dots,cudnn:full").
set -uo pipefail

START=$SECONDS
OUT="${1:-gpu_check.json}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

WHEELS="${WHEELS:-.whl}"
if [ -d "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "== installing the wheels in $WHEELS (--no-index --no-deps)"
  "$PY" -m pip install -q --no-index --no-deps --no-cache-dir "$WHEELS"/*.whl || echo "WARNING: wheel install failed"
fi

echo "== installing the package ($PY: $("$PY" --version 2>&1))"
if "$PY" -c 'import jax' >/dev/null 2>&1; then
  echo "jax $("$PY" -c 'import jax; print(jax.__version__)') is installed: pip install --no-deps -e ."
  # --no-build-isolation: the installed setuptools (the machine may have no package index); else isolated.
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --retries 0 --timeout 10 -e . \
    || echo "WARNING: pip install -e . failed; running from the repository root instead"
else
  "$PY" -m pip install -q -e . || echo "WARNING: pip install -e . failed; running from the repository root instead"
fi

# Distributions the check needs that are not importable (grain, tensorflow_datasets and array_record are not
# needed: without them finish_on_device runs the same steps from bench/gpu_check_photometry.py).
missing() {
  "$PY" - <<'EOF'
import importlib.util
need = {"jax": "jax", "flax": "flax", "optax": "optax", "ml_collections": "ml-collections", "absl": "absl-py",
        "etils": "etils[epath]", "PIL": "pillow", "numpy": "numpy"}
out = []
for module, dist in need.items():
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception:
        found = False
    if not found:
        out.append(dist)
print(" ".join(out))
EOF
}
MISSING=$(missing)
if [ -n "$MISSING" ]; then
  echo "not importable: $MISSING; trying pip with the installed jax packages pinned"
  PINS=$(mktemp)
  "$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(jax|jaxlib|jax[-_]cuda[0-9]+[-_](plugin|pjrt))==' >"$PINS"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --retries 0 --timeout 10 -c "$PINS" $MISSING || echo "WARNING: pip could not install them"
  rm -f "$PINS"
  MISSING=$(missing)
  if [ -n "$MISSING" ]; then
    echo "WARNING: still not importable: $MISSING (carry wheels in $WHEELS); the parts that need them record an error"
  fi
fi

ELAPSED=$((SECONDS - START))
BUDGET=$((540 - ELAPSED))
[ "$BUDGET" -lt 120 ] && BUDGET=120
LIMIT=$((590 - ELAPSED))
[ "$LIMIT" -lt 150 ] && LIMIT=150
echo "== python -m bench.gpu_check --out=$OUT (budget ${BUDGET} s, stopped at ${LIMIT} s)"
# shellcheck disable=SC2086
timeout -k 10 "$LIMIT" "$PY" -m bench.gpu_check --out="$OUT" --budget_s="$BUDGET" ${GPU_CHECK_ARGS:-}
RC=$?
if [ "$RC" -eq 124 ] || [ "$RC" -eq 137 ]; then
  echo "gpu_check was stopped at ${LIMIT} s; $OUT holds the parts that finished"
fi
echo "== done in $((SECONDS - START)) s (exit $RC); figures in $OUT"
exit "$RC"
