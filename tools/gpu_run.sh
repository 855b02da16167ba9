#!/usr/bin/env bash
# The device check for a session that is lent a GPU (see ../shared/gpu/README.md): run it there as
#   bash tools/gpu_run.sh            (after `bash ../shared/gpu/prepare.sh` here put the wheels in .whl/)
# It installs the carried wheels, prints as it goes, writes under $OUT and starts nothing past its deadline.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .gpu-site .whl/*.whl
export PYTHONPATH=$PWD/.gpu-site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
# The sync check first (about a minute): a told static plan, eager and compiled, under sync debug mode.
timeout 240 python3 -c "
from ditopt.bench.gpu import sync_check
for compiled in (False, True):
    print('compiled' if compiled else 'eager', 'no device-to-host copy; blocks.1:', sync_check(compiled)['blocks.1'])
" 2>&1 | tail -5 | tee "$OUT/sync.txt"
# Then the speed table at the Wan-1.3B shape, stopping new variants after 360 s.
timeout 450 python3 tools/bench_gpu.py --device cuda --shape wan-1.3b --deadline 360 --json "$OUT/gpu.json" \
  2>&1 | tee "$OUT/bench.txt"
