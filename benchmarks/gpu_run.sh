#!/usr/bin/env bash
# One device call on an H100/H200 (about 7 minutes): correctness on CUDA (tests/test_ops.py, tests/test_gpu.py),
# the kernel benchmark, the end-to-end GPT-2-small run, and the independent first-run cross-check when it has been
# copied to .gpu-tools/ (see benchmarks/README.md). Everything lands in $OUT.
set -u
OUT=${OUT:-/tmp/torchkit-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHKIT_EXT_DIR=/tmp/torchkit-ext
log=$OUT/log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$log"
python3 -c "import torchkit.ops._ext as e; print('cpp extension built:', e.build(), e.error())" > "$OUT/cpp_build.txt" 2>&1 &
cpp=$!
python3 -c "import torchkit.ops._cuda as c; print('CUDA kernels built:', c.build(verbose=True), c.error())" 2>&1 | tee -a "$log"
wait $cpp; cat "$OUT/cpp_build.txt" >> "$log"
echo "== tests" | tee -a "$log"
timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" -rfE \
  tests/test_ops.py tests/test_gpu.py 2>&1 | tail -80 > "$OUT/pytest.txt"
tail -5 "$OUT/pytest.txt" | tee -a "$log"
echo "== kernel benchmark" | tee -a "$log"
timeout ${T_BENCH:-200} python3 benchmarks/bench_kernels.py --device cuda --sizes 1e6 1e7 1e8 \
  --extra 1e9:bfloat16:0.01 --repeats 10 --out "$OUT/res" 2>&1 | tee -a "$log"
echo "== end to end" | tee -a "$log"
timeout ${T_E2E:-150} python3 benchmarks/bench_e2e_gpu.py --steps 15 --warmup 5 --out "$OUT/res" 2>&1 | tee -a "$log"
if [ -f .gpu-tools/gpu_first_run.py ]; then
  echo "== first-run cross-check" | tee -a "$log"
  timeout ${T_FIRST:-150} python3 .gpu-tools/gpu_first_run.py --out "$OUT/first_run.json" > "$OUT/first_run.log" 2>&1
  tail -40 "$OUT/first_run.log" >> "$log"
fi
echo "== done" | tee -a "$log"
