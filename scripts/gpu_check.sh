#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py says what it runs): one prepared script for a lent CUDA GPU,
# about 8 minutes, writing one JSON file.
#
#   scripts/gpu_check.sh                               # --device cuda, gpu_check.json
#   scripts/gpu_check.sh --device cpu --tiny --out x.json  # the CI smoke test (tests/test_gpu_check.py)
#
# Run from anywhere: it works in the checkout's root with the project's venv (.venv, or $PYTHON).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
out="gpu_check.json"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
start=$SECONDS
cd "$root"
"$python" scripts/gpu_check.py --workdir "$work" --out "$out" "${args[@]}"
echo "gpu_check: $((SECONDS - start)) s"
