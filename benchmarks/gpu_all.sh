#!/usr/bin/env bash
# Everything that needs a GPU, in one go, each step under its own time limit; logs and JSON land in $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_all.sh [tests] [int4tests] [e2e] [pipeline] [int4] [70b] [profile] [mid]
#   (default: tests e2e pipeline int4 70b; mid: gemm_mid's GPU tests, then its timings, layer and model)
# On the lent GPU machine (no Ray or pydantic there) pack them here, carry .gpuenv and unpack it first:
#   ../shared/tools/gpu-env pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
#       typing-inspection==0.4.5 typing-extensions==4.16.0          # Ray + what `scorer run` imports
#   mkdir -p /tmp/site && tar -xJf .gpuenv/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
steps=${*:-tests e2e pipeline int4 70b}
T_TESTS=${T_TESTS:-240} T_E2E=${T_E2E:-330} T_PIPE=${T_PIPE:-200} T_INT4=${T_INT4:-200} T_70B=${T_70B:-240}
TEXTS=${TEXTS:-2048}
for s in $steps; do
  echo "=== $s $(date -u +%H:%M:%S)"
  case $s in
    # tests/jobs are CPU tests and need pydantic, which the lent CUDA image lacks: only the GPU folders here
    tests) timeout $T_TESTS python -m pytest -q -m gpu -p no:cacheprovider tests/int4 tests/model 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    int4tests) timeout $T_TESTS python -m pytest -q -x -m gpu -p no:cacheprovider tests/int4 2>&1 | tee "$OUT/int4_tests.log" | tail -15 ;;
    profile) timeout ${T_PROFILE:-150} python benchmarks/profile_layers.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.log" | tail -60 ;;
    e2e) timeout $T_E2E python benchmarks/e2e.py --texts "$TEXTS" --peers "${PEERS:-both}" ${VARIANTS:+--variants "$VARIANTS"} 2>&1 | tee "$OUT/e2e.log" | grep -v "^Row(" ;;
    pipeline) timeout $T_PIPE python benchmarks/pipeline_gpu.py --texts "$TEXTS" --shards 8 2>&1 | grep -v "^\[scorer" | tee "$OUT/pipeline.log" | tail -12 ;;
    int4) timeout $T_INT4 python benchmarks/int4.py --out "$OUT" 2>&1 | tee "$OUT/int4_bench.log" | tail -5 ;;
    mid) timeout $T_TESTS python -m pytest -q -x -m gpu -p no:cacheprovider tests/int4/test_int4_gpu.py -k mid 2>&1 | tee "$OUT/mid_tests.log" | tail -8 \
           && timeout $T_INT4 python benchmarks/int4.py --out "$OUT" --no-model --ms 32,64,100,128,256,512,1024 2>&1 | tee "$OUT/mid_bench.log" | tail -40 \
           && timeout $T_INT4 python benchmarks/latency.py --variants int4+compile,int4+compile+mid,bf16+compile --cases 1x48,1x100,3x70,8x64,1x512,2x400 2>&1 | tee "$OUT/mid_latency.log" | tail -12 ;;
    70b) timeout $T_70B python benchmarks/e2e.py --model-shape 70b --texts "${TEXTS_70B:-512}" --variants int4 2>&1 | tee "$OUT/e2e_70b.log" | tail -6 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
