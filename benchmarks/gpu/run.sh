#!/usr/bin/env bash
# Run one part of the GPU check on a machine with CUDA: `bash benchmarks/gpu/run.sh check|pipeline OUT`.
# Wheels carried in .whl/ (and .whl2/ for the pipeline) are installed into /tmp/site, which stays while the
# machine is warm; refdir is imported from this checkout through a small shim package.
set -euo pipefail
part=$1; out=$2
cd "$(dirname "$0")/../.."
for d in .whl .whl2 .whl3; do
  if [ -d "$d" ] && ls "$d"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$d"/*.whl
  fi
done
mkdir -p /tmp/shim/refdir
cp refdir/__init__.py /tmp/shim/refdir/
for p in flows workers schemas; do ln -sfn "$PWD/$p" "/tmp/shim/refdir/$p"; done
export PYTHONPATH="/tmp/shim:/tmp/site:$PWD" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ "$part" = check ]; then
  python3 benchmarks/gpu/check.py "$out"
else
  python3 benchmarks/gpu/pipeline.py "$PWD/.gpu/organism" "$out"
fi
