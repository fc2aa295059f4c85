#!/usr/bin/env bash
# One device call: the GPU tests, then the benchmarks named as arguments (moe, attention, stack, tune, tune-mid (the decode batches of a loaded server), fp8-tune,
# adapters, adapters-mix, engine, prefill, chunked, kv-fp8, step-graphs, serve, serve-features (issue 15: chunked prefill of a 16k prompt in the open loop, structured output, prefix caching),
# structured (the constrained batch's GPU test and its serve row), tails (the TAIL_M experiment: tests, A/B per token count, decode step), serve-no-step-graphs, serve-adapters,
# serve-fp8, save-cache, tp, serve-tp: the last two on a machine with 2 GPUs). serve takes about 4 minutes and serve-adapters about 3: give each its own call.
# Logs go to $OUT (the device tool brings them back). Usage: bash bench/device_run.sh tests moe attention
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# Triton's compiled kernels, kept in an ignored folder of the checkout: a lent machine starts with an empty cache, and
# the GPU tests spend minutes compiling. The `save-cache` step packs it into $OUT (6 MB packed, 52 MB unpacked in
# session 7); copy that file to .triton_cache.tgz (ignored) and name it in `carry`: it is unpacked here. Kernels
# whose source changed since simply compile again.
export TRITON_CACHE_DIR=$PWD/.triton_cache
if [ -f .triton_cache.tgz ] && [ ! -d "$TRITON_CACHE_DIR" ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar xzf .triton_cache.tgz -C "$TRITON_CACHE_DIR"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The lent image has grpcio 1.84; the stubs need 1.85.1. Carry the wheels in .wheels (`pip download grpcio
# protobuf --only-binary=:all: --python-version 3.12 --no-deps -d .wheels`, an ignored folder) and name it in `carry`.
if [ -d .wheels ] && ! python3 -c "import grpc, sys; sys.exit(tuple(map(int, grpc.__version__.split('.')[:2])) < (1, 85))"; then
  python3 -m pip install -q --no-index --no-deps --find-links .wheels --upgrade grpcio protobuf
fi
# Structured output's grammar library (llguidance, one wheel with no dependencies) is not in the image either:
# `pip download llguidance==1.9.1 --only-binary=:all: --python-version 3.12 --no-deps -d .wheels`.
if [ -d .wheels ] && ! python3 -c "import llguidance" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --find-links .wheels llguidance
fi
for step in "$@"; do
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    moe) python3 -m bench.moe_layer 2>&1 | tee "$OUT/moe_layer.log" ;;
    tune) python3 -m bench.moe_layer --tune --tokens 1 16 64 256 1024 4096 2>&1 | tee "$OUT/moe_tune.log" ;;
    tune-mid) python3 -m bench.moe_layer --tune --tokens 320 384 448 512 640 768 2>&1 | tee "$OUT/moe_tune_mid.log" ;;
    attention) python3 -m bench.paged_attention 2>&1 | tee "$OUT/paged_attention.log"
               python3 -m bench.prefill_attention 2>&1 | tee "$OUT/prefill_attention.log" ;;
    stack) python3 -m bench.layer_stack 2>&1 | tee "$OUT/layer_stack.log" ;;
    adapters) python3 -m bench.adapters 2>&1 | tee "$OUT/adapters.log" ;;
    engine) python3 -m bench.engine_step --profile 64 2>&1 | tee "$OUT/engine_step.log" ;;
    serve) python3 -m bench.serve 2>&1 | tee "$OUT/serve.log" ;;
    serve-adapters) python3 -m bench.serve --adapters 64 --shapes 128x128 2>&1 | tee "$OUT/serve_adapters.log" ;;
    prefill) python3 -m bench.prefill 2>&1 | tee "$OUT/prefill.log" ;;
    chunked) python3 -m bench.prefill --only chunked 2>&1 | tee "$OUT/prefill_chunked.log"
             python3 -m bench.prefill --profile-chunk 256 2>&1 | tee "$OUT/profile_chunk.log" ;;
    fp8-tune) python3 -m bench.moe_layer --fp8 --tune --write 2>&1 | tee "$OUT/moe_fp8_tune.log"
              cp lorax_server/kernels/fused_moe.py "$OUT/fused_moe.py" ;;  # the table it wrote comes back
    adapters-mix) python3 -m bench.adapters --serve-mix 384 2>&1 | tee "$OUT/adapters_mix.log" ;;
    kv-fp8) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fp8_kv_cache.py 2>&1 | tail -5
            python3 -m bench.engine_step --batches 64 --per-request 2>&1 | tee "$OUT/engine_step_bf16kv.log" | tail -6
            python3 -m bench.engine_step --batches 64 --per-request --kv-fp8 2>&1 | tee "$OUT/engine_step_fp8kv.log" | tail -6 ;;
    serve-fp8) python3 -m bench.serve --fp8 --adapters 64 --shapes 128x128 2>&1 | tee "$OUT/serve_fp8.log" ;;
    step-graphs) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_step_graphs.py 2>&1 | tail -15
                 python3 -m bench.prefill --only chunked --chunks 128 256 --variants default no-step-graphs 2>&1 | \
                   tee "$OUT/prefill_step_graphs.log" ;;
    serve-features) python3 -c "import jsonschema" 2>/dev/null || echo "no jsonschema here: outputs only parsed"
                    python3 -m bench.serve --shapes 128x128 --long-prompt 16384 --chunk-tokens 256 --structured 64 \
                      --prefix 2000 2>&1 | tee "$OUT/serve_features.log" ;;
    tails) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fused_moe.py 2>&1 | tail -3
           python3 -m bench.moe_layer --peer --tokens 256 448 512 640 768 1024 2>&1 | tee "$OUT/moe_tails.log"
           for t in 0 32; do LORAX_MOE_TAIL_M=$t python3 -m bench.engine_step --batches 512 --context 256 2>&1 | tail -4; done ;;
    structured) python3 -m pytest -q -p no:cacheprovider tests/gpu/test_engine_on_gpu.py -k constrained 2>&1 | tail -3
                python3 -m bench.serve --shapes --open-requests 0 --structured 64 2>&1 | tee "$OUT/serve_structured.log" ;;
    serve-no-step-graphs) LORAX_STEP_GRAPHS=0 python3 -m bench.serve --shapes 128x128 2>&1 | tee "$OUT/serve_no_step_graphs.log" ;;
    save-cache) [ -d "$TRITON_CACHE_DIR" ] && tar czf "$OUT/triton_cache.tgz" -C "$TRITON_CACHE_DIR" . && \
                  du -h "$OUT/triton_cache.tgz" ;;
    tp) python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.tp_nccl 2>&1 | \
        grep -v "^W1\|OMP_NUM\|^\*\*\*" | tee "$OUT/tp_nccl.log" ;;
    serve-tp) python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m bench.serve --tp 2 2>&1 | \
        grep -v "^W1\|OMP_NUM\|^\*\*\*" | tee "$OUT/serve_tp.log" ;;
  esac
done
