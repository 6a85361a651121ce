#!/usr/bin/env bash
# The device checks in one call on an H100/H200, run in the order STAGES lists them (default: all):
#   tests   tests/test_ops.py and tests/test_gpu.py on CUDA
#   onepass the same tests with the GPU one pass, the one-launch segments and the tiled decode on
#           (TORCHKIT_GPU_ONE_PASS=1, TORCHKIT_GPU_SEGMENTS=1, TORCHKIT_GPU_TILED_DECODE=1), then
#           bench_kernels.py --passes:
#           each implementation's one pass against its two passes (d = 1e7, 1e8; k = 0.1%, 1%; fp32)
#   segments benchmarks/bench_segments.py on CUDA with the small segments in one launch (TORCHKIT_GPU_SEGMENTS=1):
#           150 tensors of 8000 entries, one segments_step_ against one fused op per tensor
#   bench   benchmarks/bench_kernels.py (d = 1e6 .. 1e8, and 1e9 in bf16)
#   tune    benchmarks/tune_gpu.py (CUDA build variants, per-kernel breakdown, Triton histogram cost)
#   e2e     benchmarks/bench_e2e_gpu.py (GPT-2 small: hook and optimizer)
#   hook    benchmarks/bench_hook.py (the hook's time per bucket against the kernel's)
#   steady  benchmarks/bench_steady.py (the fused steps with the state carried on a trained model's gradients, the
#           host time per call apart, and the decode of 8 messages as emitted and sorted against its floor)
#   ties    benchmarks/bench_ties.py on CUDA (the EF21 step on tied input against random input, d = 2^26)
#   wrapper benchmarks/bench_wrapper.py (the wrapper's step time and memory against AdamW)
#   ncu     Nsight Compute (speed of light, memory, occupancy) on the CUDA kernels of one step per op
#   first   the independent cross-check, when copied to .gpu-tools/ (see benchmarks/README.md)
# Everything lands in $OUT; T_<STAGE> bounds each stage in seconds; the log records each stage's seconds.
set -u
OUT=${OUT:-/tmp/torchkit-gpu}
STAGES=${STAGES:-tests onepass segments bench tune e2e hook steady ties wrapper ncu first}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHKIT_EXT_DIR=/tmp/torchkit-ext
log=$OUT/log.txt
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.sm,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$log"
# the CPU kernel only the tests need: built in the background while the GPU works
python3 -c "import torchkit.ops._ext as e; print('cpp extension built:', e.build(), e.error())" > /tmp/cpp_build.txt 2>&1 &
cpp=$!
python3 -c "import torchkit.ops._cuda as c; print('CUDA kernels built:', c.build(verbose=True), c.error())" 2>&1 | tee -a "$log"

stage_tests() {
  wait $cpp; cat /tmp/cpp_build.txt >> "$log"
  timeout ${T_TESTS:-200} python3 -m pytest -q -p no:cacheprovider -p no:logging -o addopts="" -m "not slow" -rfE \
    tests/test_ops.py tests/test_gpu.py tests/test_custom_ops.py 2>&1 | tail -80 > "$OUT/pytest.txt"
  tail -5 "$OUT/pytest.txt" | tee -a "$log"
}
stage_onepass() {
  wait $cpp
  TORCHKIT_GPU_ONE_PASS=1 TORCHKIT_GPU_SEGMENTS=1 TORCHKIT_GPU_TILED_DECODE=1 timeout ${T_ONEPASS_TESTS:-200} \
    python3 -m pytest -q -p no:cacheprovider -p no:logging -o addopts="" -m "not slow" -rfE tests/test_ops.py \
    tests/test_gpu.py 2>&1 | tail -60 > "$OUT/pytest_onepass.txt"
  tail -5 "$OUT/pytest_onepass.txt" | tee -a "$log"
  timeout ${T_ONEPASS:-150} python3 benchmarks/bench_kernels.py --device cuda --sizes 1e7 1e8 --ratios 0.001 0.01 \
    --dtypes float32 --passes --repeats 10 --out "$OUT/res_onepass" 2>&1 | tee -a "$log"
}
stage_segments() {
  TORCHKIT_GPU_SEGMENTS=1 timeout ${T_SEGMENTS:-120} python3 benchmarks/bench_segments.py --device cuda \
    --tensors 150 --size 8000 --repeats 15 --out "$OUT/res" 2>&1 | tee -a "$log"
}
stage_bench() {
  timeout ${T_BENCH:-200} python3 benchmarks/bench_kernels.py --device cuda ${BENCH_ARGS:---sizes 1e6 1e7 1e8 \
    --extra 1e9:bfloat16:0.01} --repeats 10 --out "$OUT/res" 2>&1 | tee -a "$log"
}
stage_tune() { timeout ${T_TUNE:-200} python3 benchmarks/tune_gpu.py --out "$OUT/res" 2>&1 | tee -a "$log"; }
stage_e2e() {
  timeout ${T_E2E:-150} python3 benchmarks/bench_e2e_gpu.py --steps 15 --warmup 5 --out "$OUT/res" 2>&1 | tee -a "$log"
}
stage_hook() {
  timeout ${T_HOOK:-120} python3 benchmarks/bench_hook.py --sizes 4e6 2.7e7 1e8 --out "$OUT/res" 2>&1 | tee -a "$log"
}
stage_steady() {
  timeout ${T_STEADY:-120} python3 benchmarks/bench_steady.py --device cuda --steps 300 \
    --warm 100 --out "$OUT/res" 2>&1 | tee -a "$log"
}
stage_ties() {
  timeout ${T_TIES:-90} python3 benchmarks/bench_ties.py --device cuda --out "$OUT/res" 2>&1 | tee -a "$log"
}
stage_wrapper() {
  timeout ${T_WRAPPER:-120} python3 benchmarks/bench_wrapper.py --device cuda --out "$OUT/res" 2>&1 | tee -a "$log"
}
stage_ncu() {
  timeout ${T_NCU:-120} ncu --clock-control none -k regex:tk_ -c 24 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section Occupancy python3 benchmarks/tune_gpu.py --ncu-target \
    > "$OUT/ncu.txt" 2>&1
  grep -E "tk_|Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Compute \(SM\) Throughput" \
    "$OUT/ncu.txt" | head -120 | tee -a "$log"
}
stage_first() {
  [ -f .gpu-tools/gpu_first_run.py ] || return 0
  timeout ${T_FIRST:-150} python3 .gpu-tools/gpu_first_run.py --out "$OUT/first_run.json" > "$OUT/first_run.log" 2>&1
  tail -40 "$OUT/first_run.log" >> "$log"
}
for s in $STAGES; do
  echo "== $s" | tee -a "$log"
  t0=$SECONDS
  "stage_$s"
  echo "== $s took $((SECONDS - t0)) s" | tee -a "$log"
done
echo "== done" | tee -a "$log"
