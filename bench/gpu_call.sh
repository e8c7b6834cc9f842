#!/usr/bin/env bash
# One device call's measurements, by name, each cut to its own time limit so a slow step cannot eat the call.
#
#   bash bench/gpu_call.sh decode tests        # on the GPU machine, in the repository root; results under $OUT
#   bash bench/gpu_call.sh serve_ab            # the serving A/B (~7 min on an H100 with a cold tuner)
#
# Sets (in the order given; each writes $OUT/<set>/ and a log):
#   decode    bench/w4a16_decode.py at group 64 (M = 16, 32) and 128 (M = 16): the decode tiles side by side (the best
#             split-K swap tiles, the stream-K `swapk_*` and Gluon `glk_*` ones) with fp16 cuBLAS, one process per
#             group size (~9 min: a call of its own; each shape saved as it ends)
#   kernels   bench/kernels.py --only w4a16 (issue 26's table: g128, M = 1, 16, 32, 64 then 256, 2048 in a second
#             process; tuned ours, Gluon, tinygemm, fp16 cuBLAS; each shape saved as it ends)
#   kernels_prefill  the same at the prefill and mixed-step sizes only (M = 192, 256, 2048: ~4 min)
#   ncu       bench/w4a16_ncu.py on the 4096 x 12288 linear at M = 16 and 32 (the tuner's top 3 each)
#   tests     the GPU tests of the W4A16 kernels (the stream-K ones first: run them before any timing of them) and of
#             the engine's look-ahead mark and device timeline
#   serve_ab  bench/serve.py --no-hf --no-prefix, the look-ahead mark on and off (PIPELINE_LOOKAHEAD_MARK=0)
#   serve_prefix_ab  bench/serve.py --ab-workload prefix: the shared-prefix workload (cache on, 32 and 8 clients) on
#             a server each: the default, the look-ahead mark at 1.0 (an arrival after the mark waits a whole extra
#             step), and prefill steps without decoders riding along (--no-mixed-steps: an arrival's own step has 160
#             rows, not ~190); one round (~7 min with a seeded tuner)
#   serve     bench/serve.py --no-hf (batched, batch 1, the prefix workload, the second start)
#   serve_batched  bench/serve.py --no-prefix --no-hf: the batched and batch-1 runs alone (~4-5 min, cold tuner)
#   serve_peers  bench/serve.py --no-prefix: batched and batch 1 with the `transformers` peers (static `generate`,
#             continuous batching) in the same run (~6-7 min on an H100 with a cold tuner)
#   serve_all  bench/serve.py with no flag: all of the above parts and the `transformers` peers, in that order (each
#             part saved as it ends); fits one call only with a seeded tuning cache (.gpu_tuning, below)
#   engine1   bench/engine.py --profile-only --kinds w4: batch-1 decode (w4a16, w4a16_kv8; 512 tokens, CUDA graphs) of
#             the 7B against its roofline, with the kernels' profile (issue 26's engine re-measure)
#   decode_step  bench/decode_profile.py at serving's decode batches (26 x 704, 32 x 1024): a captured decode step's
#             GPU time by kernel (linears, attention, the rest) against its byte floor
#   prefill   bench/prefill.py --rows w4a16_kv8 (where a prefill step's time goes, torch.profiler's top kernels)
# The tuner's file (every config's time at every shape it tuned) is copied to $OUT/tuning after each set. Carried
# back (run's carry: [".whl", ".gpu_tuning"]) it seeds a fresh machine's tuning cache, so a serving run does not
# spend its first ~90-120 s re-tuning what an earlier call tuned (choices are keyed by GPU model, Triton, kernel
# version and config table: stale ones are ignored); after a call: cp <files_at>/tuning/*.json .gpu_tuning/.
# The startup figures of such a run say how many shapes were loaded rather than timed (tuning_loaded_keys).
# Wheels: the packages the GPU image lacks are installed from .whl/ (git-ignored; carry it) into /tmp/site.
set -u -o pipefail
OUT=${OUT:-bench/results/gpu_call}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ here: hydra-core, fastapi, ... must already be importable"; export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PIPELINE_CACHE_DIR=${PIPELINE_CACHE_DIR:-/tmp/pipeline_cache}
if ls .gpu_tuning/*.json >/dev/null 2>&1; then   # never over what this (warm) machine tuned since
  mkdir -p "$PIPELINE_CACHE_DIR/tuning" && cp -n .gpu_tuning/*.json "$PIPELINE_CACHE_DIR/tuning/" \
    && echo "tuning cache seeded from .gpu_tuning: $(ls .gpu_tuning)"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
DECODE=swap_m16_n64_c4_pr,swap_m16_n64_c8,swap_m16_n64_c2_s8_pr,swap_m16_n64_c4_np,swapk_m16_n64_c2_np,\
swapk_m16_n64_c4_np,swapk_m16_n64_c2_s8_np,swapk_m16_n64_c2_pr,swapk_m16_n128_c2_np,swapk_m16_n64_c4_k8,\
swap_m32_n64_c4_k8,swap_m32_n64_c4_np,swapk_m32_n64_c2_np,swapk_m32_n64_c4_np,swapk_m32_n64_c2_k8,swap_m64_n64_c2_k8,\
swap_m64_n64_c2_np,swapk_m64_n64_c2_np,swapk_m16_n64_c2_np_nl,swapk_m16_n64_c4_np_nl,swapk_m16_n64_c2_s8_np_nl,\
swapk_m32_n64_c2_np_nl,glk_m16_n128_k16_s8_c1,glk_m16_n128_k16_s14_c1,glk_m16_n64_k16_s12_c1,\
glk_m16_n256_k16_s8_c1,glk_m32_n128_k16_s8_c1,glk_m32_n256_k16_s6_c1,glk_m16_n64_k16_s12_c1_nl,\
glk_m16_n128_k16_s8_c1_nl,glk_m32_n128_k16_s8_c1_nl

step() {   # step NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME/log, print its tail
  local name=$1 limit=$2; shift 2
  mkdir -p "$OUT/$name"
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name/log" | tail -40
  echo "== $name exit ${PIPESTATUS[0]}"
  mkdir -p "$OUT/tuning" && cp -r "$PIPELINE_CACHE_DIR/tuning/." "$OUT/tuning/" 2>/dev/null || true
}

for set in "$@"; do
  case $set in
    decode)
      step decode_g64 330 python3 bench/w4a16_decode.py --group 64 --ms 16,32 --pdl off --no-floors --cublas \
        --configs "$DECODE" --out "$OUT/decode_g64"
      step decode_g128 220 python3 bench/w4a16_decode.py --group 128 --ms 16 --pdl off --no-floors --cublas \
        --configs "$DECODE" --out "$OUT/decode_g128" ;;
    kernels)   # two processes: with the stream-K candidates one would not finish six row counts in a call's time
      step kernels_decode 280 python3 bench/kernels.py --only w4a16 --ms 1,16,32,64 --out "$OUT/kernels_decode"
      step kernels_large 280 python3 bench/kernels.py --only w4a16 --ms 256,2048 --out "$OUT/kernels_large" ;;
    kernels_prefill) step kernels_prefill 300 python3 bench/kernels.py --only w4a16 --ms 192,256,2048 \
      --out "$OUT/kernels_prefill" ;;
    ncu) step ncu 300 python3 bench/w4a16_ncu.py --ms 16,32 --top 3 --out "$OUT/ncu" ;;
    tests)
      step tests_engine 200 python3 -m pytest -m gpu -q tests/test_engine.py tests/test_speculative.py -k "lookahead or timeline or drafts"
      step tests_w4a16_sk 150 python3 -m pytest -m gpu -q tests/test_kernel_w4a16_gluon_sk.py \
        tests/test_kernel_w4a16.py -k "streamk or bit_identical"
      step tests_w4a16 240 python3 -m pytest -m gpu -q -x tests/test_kernel_w4a16.py ;;
    serve_ab) step serve_ab 540 python3 bench/serve.py --no-hf --no-prefix --ab mark nomark:PIPELINE_LOOKAHEAD_MARK=0 \
      --ab-rounds 1 --out "$OUT/serve_ab" ;;
    serve_prefix_ab) step serve_prefix_ab 580 python3 bench/serve.py --no-hf --ab-workload prefix --ab m067 \
      m100:PIPELINE_LOOKAHEAD_MARK=1.0 nomixed:--no-mixed-steps --ab-rounds 1 --out "$OUT/serve_prefix_ab" ;;
    serve_batched) step serve_batched 420 python3 bench/serve.py --no-prefix --no-hf --out "$OUT/serve_batched" ;;
    serve_peers) step serve_peers 580 python3 bench/serve.py --no-prefix --out "$OUT/serve_peers" ;;
    serve_all) step serve_all 590 python3 bench/serve.py --out "$OUT/serve_all" ;;
    serve) step serve 580 python3 bench/serve.py --no-hf --out "$OUT/serve" ;;
    engine1) step engine1 300 python3 bench/engine.py --profile-only --kinds w4 --out "$OUT/engine1.json" ;;
    decode_step) step decode_step 300 python3 bench/decode_profile.py --points 26x704,32x1024 --out "$OUT/decode_step.json" ;;
    prefill) step prefill 400 python3 bench/prefill.py --rows w4a16_kv8 --out "$OUT/prefill" ;;
    *) echo "unknown set: $set (decode, kernels, kernels_prefill, ncu, tests, serve_ab, serve_prefix_ab, serve, serve_all, serve_batched, serve_peers, engine1, decode_step, prefill)"; exit 2 ;;
  esac
done
