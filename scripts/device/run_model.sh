#!/usr/bin/env bash
# On the GPU machine: the whole engine on the CUDA backend. Builds the project (dependencies from
# scripts/device/env.sh), then, as asked:
#   model   — GPU whole-model parity tests (tests/gpu_model) and the default model's check;
#   ranks   — `starserve generate` with the CUDA backend: 1 rank vs 2 and 4 ranks sharing the GPU
#             (star and exact), the greedy text must be identical; where it is not, the token at
#             which the runs part and its top-2 logprob margin in each (logprob_diff.py);
#   bench   — bench/gpu/model_bench (JSON) next to bench/gpu/model_peers.py (HF transformers,
#             torch matmul) in the same run; BENCH_LENGTHS / BENCH_LAYERS / BENCH_MODES / BENCH_PREFILL
#             (the --prefill-kernel) override.
# The default model file is larger than one device call may carry: it travels in three parts, one per call with
# third_party/debs (`split -b 33M` into .carry/model-a, -b and -c), and is joined here once all have arrived.
#   eval    — evals/star_accuracy.py on the CUDA backend (EVAL_LENGTHS, EVAL_SAMPLES, EVAL_CONFIGS).
#   serve   — the gRPC server on the CUDA backend (configures with gRPC): starctl chat, a star
#             completion over a document, a bad request and a timed-out one, then a completion
#             again to show the server kept serving. SERVE_RANKS=N starts it on N ranks (one GPU
#             each where the machine has N GPUs: phase 2 merges over NCCL).
#   chunked — bench/chunked_prefill_bench.py (configures with gRPC): the CPU backend on 2 ranks, then the
#             CUDA backend on 1 rank, each with chunking off and on (JSON: $OUT/chunked_cpu.jsonl,
#             $OUT/chunked_cuda.jsonl); CHUNKED_CPU_ARGS / CHUNKED_CUDA_ARGS add or override its flags,
#             CHUNKED_BACKENDS (default "cpu cuda") picks the runs.
#             The Python stubs come from third_party/wheels/stubs (bench/make_stubs.py; carry that
#             folder) where grpcio-tools is not installed.
#   batch   — bench/gpu/model_bench --shape smollm2 --seqs S for S in BATCH_SEQS (default 1 8 64 256), BATCH_CONTEXT
#             (default 256) tokens each, BATCH_DECODE (default 32) timed steps: ms per decode step, the host's share and the time blocked on the device,
#             each next to model_peers.py --shape smollm2 --seqs S (HF transformers' batched decode) in the same
#             call (JSON: $OUT/decode_batch.jsonl).
#   profile — model_bench --shape smollm2 --seqs PROFILE_SEQS (default 256) under scripts/device/profile/sampler.c:
#             the host's time per function ($OUT/host_profile.txt).
#   serveprofile — the server (CUDA, 1 rank) under the same profiler while load_bench drives SERVE_PROFILE_STREAMS
#             (default 256) streams from LOAD_PROCESSES (8) client processes ($OUT/serve_host_profile.txt).
#   load8b  — the load step on a random-weight Llama-3-8B-shaped GGUF that scripts/make_random_gguf.py writes there
#             (~16 GB in /tmp, kept on a warm machine; the gguf wheel from third_party/wheels/gguf, the tokenizer from
#             TOKENIZER_GGUF, default .carry/tok/smollm2-tokenizer.gguf, made by make_random_gguf.py --tokenizer-only);
#             LOAD8B_CONCURRENCY (default 1 8 64) -> $OUT/load_8b_cuda.jsonl. scripts/device/fetch_peers.sh (run
#             here) makes the wheel, the tokenizer file and llamaload's source. Not yet run.
#   llamaload — llama.cpp's llama-server, built here with CUDA for sm_90 from .carry/llamacpp/llama.cpp-*.tar.gz
#             (llama-cpp-python 0.3.36's vendored llama.cpp without docs/, models/ and the other GPU backends, 11 MB;
#             the build kept in /tmp on a warm machine), under bench/load_bench.py --http-address, then starserve's
#             HTTP API under the same mix (load_bench.py --api http), both on LLAMA_LOAD_MODEL (default the SmolLM2
#             file; /tmp/starserve-random-8b.gguf after load8b), LLAMA_LOAD_CONCURRENCY (default 1 8 64)
#             -> $OUT/load_llamacpp.jsonl, $OUT/load_starserve_http.jsonl. Not yet run.
#   reuse   — bench/context_reuse_bench.py (configures with gRPC): context reuse on the CUDA backend, 1 rank: the
#             first question about a document of REUSE_LENGTHS tokens (default 8192 32768 131072), global and star,
#             next to later ones answered from the cached context (JSON: $OUT/context_reuse.jsonl).
#   load    — bench/load_bench.py (configures with gRPC): the server on the CUDA backend, 1 rank, under
#             LOAD_CONCURRENCY (default 1 8 64 256) streams of 128 greedy tokens each (2 per client; the clients spread
#             over LOAD_PROCESSES, default 8, client processes), with rank 0's
#             engine time per decode step by part (JSON: $OUT/load_cuda.jsonl).
#   kvshift — the trained KV-shifting model and its baseline (scripts/device/train_reference.sh; carry them with the
#             corpus's val.bin in KVSHIFT_DIR, default .carry/kvshift/{kvshift-6l,llama-6l,val.bin}): the GPU
#             tests whose names hold KvShift, then evals/perplexity.py over every validation window through a
#             server per model, backend (KVSHIFT_BACKENDS, default "cuda cpu") and mode (global; star with blocks of 128) -> $OUT/kvshift_ppl.jsonl.
#   attamba — the trained Attamba models (scripts/device/train_attamba.sh; carry them with the corpus's val.bin in
#             ATTAMBA_DIR, default .carry/attamba/{attamba-6l-p4-l32,attamba-6l-p8-l16,val.bin}; ATTAMBA_MODELS
#             names the model folders): the GPU tests whose names hold Ssm or Attamba, then evals/perplexity.py
#             over every validation window through a server per model on the CUDA backend, global and star with
#             blocks of 128 -> $OUT/attamba_ppl.jsonl.
#   kvbench — bench/gpu/model_bench --arch both: the Llama-3-8B shape and its KV-shifting variant in the
#             same run (BENCH_LENGTHS default 16384,32768, BENCH_LAYERS, BENCH_MODES) -> $OUT/kvshift_bench.jsonl
#             with {"bench":"kvshift_overhead",...} ratio lines, and the table from summarize_model.py.
#   lnfree  — the LayerNorm-free GPT-2 family: trains it when no exports are found (scripts/device/train_lnfree.sh
#             on the corpus in LNFREE_DIR, default .carry/corpus; exports kept in /tmp/lnfree-out on a warm machine,
#             copied to $OUT), the GPU tests of its ops and golden (HeadTemperature, GpuGpt2Ops, LnFreeGoldenGpu,
#             FamilyGoldenGpu/gpt2), then evals/entropy_map.py per trained model through a server on the CUDA
#             backend (1 rank) and the CPU backend (2 ranks): global, exact and star (blocks of 32) against the
#             PyTorch reference on the same windows -> $OUT/lnfree_entropy.jsonl and $OUT/lnfree_maps/.
#   gemma   — Gemma3Gpu.* (tests/gpu_model/test_gemma3_gpu.cpp) once the five Gemma parts have arrived.
#   lifecycle — tests/e2e/lifecycle_e2e.sh with LIFECYCLE_SERVER_ARGS="--backend cuda" (2 ranks sharing the
#             GPU, so the MPI host communicator): health while loading, drain, watchdog, killed worker.
# Usage: scripts/device/run_model.sh [model] [ranks] [eval] [bench] [batch] [profile] [serveprofile] [serve] [chunked] [reuse] [load] [load8b] [llamaload] [lifecycle] [kvshift] [attamba] [kvbench] [lnfree] [gemma]
#        (default: model ranks bench)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STEPS=${*:-model ranks bench}
export NCCL_NVLS_ENABLE=0
source scripts/device/env.sh || exit 1
BUILD=${STARSERVE_DEVICE_BUILD:-build-gpu}

# Keep the model's parts between calls on a warm machine; join them once all have arrived.
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p models /tmp/starserve-model
for part in .carry/model-?/*; do [ -f "$part" ] && cp -n "$part" /tmp/starserve-model/; done
if [ ! -f "$MODEL" ] && [ "$(ls /tmp/starserve-model 2>/dev/null | wc -l)" -ge 3 ]; then
  cat /tmp/starserve-model/smol.part* > "$MODEL"
fi
if [ -f "$MODEL" ]; then
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $MODEL" | sha256sum -c - || rm -f "$MODEL"
fi
[ -f "$MODEL" ] || echo "default model not here yet (parts: $(ls /tmp/starserve-model 2>/dev/null | tr '\n' ' '))"
# Gemma-3-270M (253 MB) travels in five parts, .carry/gemma-{a..e}/gemma.part{0..4}, one per call.
GEMMA=models/gemma-3-270m-q4_k_m.gguf
mkdir -p /tmp/starserve-gemma
for part in .carry/gemma-?/gemma.part*; do [ -f "$part" ] && cp -n "$part" /tmp/starserve-gemma/; done
if [ ! -f "$GEMMA" ] && [ "$(ls /tmp/starserve-gemma 2>/dev/null | wc -l)" -ge 5 ]; then
  cat /tmp/starserve-gemma/gemma.part0 /tmp/starserve-gemma/gemma.part1 /tmp/starserve-gemma/gemma.part2 \
    /tmp/starserve-gemma/gemma.part3 /tmp/starserve-gemma/gemma.part4 > "$GEMMA"
  echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $GEMMA" | sha256sum -c - || rm -f "$GEMMA"
fi

SECONDS=0
TARGETS=(starserve gpu_model_tests model_bench gpu_kernel_tests)
GRPC=${STARSERVE_GRPC:-OFF}
case " $STEPS " in *" serve "* | *" chunked "* | *" reuse "* | *" load "* | *" load8b "* | *" llamaload "* | *" lifecycle "* | *" kvshift "* | *" attamba "* | *" lnfree "*) GRPC=ON TARGETS+=(starctl) ;; esac
if [ ! -f "$BUILD/build.ninja" ] || { [ $GRPC = ON ] && ! grep -q "STARSERVE_GRPC:BOOL=ON" "$BUILD/CMakeCache.txt"; }; then
  STARSERVE_GRPC=$GRPC starserve_configure "$BUILD" >"$OUT/configure_model.log" 2>&1 ||
    { tail -30 "$OUT/configure_model.log"; exit 1; }
fi
# The multi-rank GPU tests that ctest -L gpu runs in the model step, where this build has MPI/NCCL.
for t in star_gpu_mpi_tests nccl_comm_tests; do
  grep -q "^build bin/$t:" "$BUILD/build.ninja" && TARGETS+=("$t")
done
# The server steps alone need only the server and its client.
case " $STEPS " in *" model "* | *" ranks "* | *" bench "* | *" batch "* | *" profile "* | *" eval "* | *" gemma "* | *" kvshift "* | *" attamba "* | *" kvbench "* | *" lnfree "*) ;;
  *) TARGETS=(starserve starctl) ;;
esac
cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}" \
  >"$OUT/build_model.log" 2>&1 || { grep -B2 -A10 "error" "$OUT/build_model.log" | head -80; exit 1; }
echo "built in ${SECONDS}s"
BIN=$BUILD/bin

for step in $STEPS; do
  case $step in
  model)
    echo "== gpu model tests"
    timeout 400 "$BIN/gpu_model_tests" 2>&1 | tee "$OUT/gpu_model_tests.log" | grep -v "^\[ RUN\|^\[       OK" | tail -40
    echo "== other gpu tests (kernels, NCCL)"
    (cd "$BUILD" && timeout 300 ctest -L gpu -E ModelGpu --output-on-failure) 2>&1 | tee "$OUT/gpu_ctest.log" | tail -8
    ;;
  ranks)
    [ -f "$MODEL" ] || { echo "ranks: no model"; continue; }
    echo "== CUDA backend: 1 rank vs several ranks ($(nvidia-smi -L | wc -l) GPU(s); greedy text must match)"
    head -c 6000 README.md > /tmp/ctx.txt
    # gen TAG NP ARGS...: the greedy text on stdout; stderr (with each token's top-2 logprobs) in
    # $OUT/ranks_TAG.err, so a difference can be traced to the token and its margin.
    gen() {
      local tag=$1 np=$2; shift 2
      timeout 120 mpirun --allow-run-as-root --oversubscribe -np "$np" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH \
        "$BIN/starserve" generate --model "$MODEL" --backend cuda --context-file /tmp/ctx.txt \
        --query "What is starserve? Answer briefly." --chat --max-tokens 40 --temperature 0 --logprobs 2 "$@" \
        2>"$OUT/ranks_$tag.err"
      cat "$OUT/ranks_$tag.err" >>"$OUT/ranks.log"
    }
    # SAME, or DIFFERENT with the word at which the two texts part (1-based, whitespace words).
    verdict() {
      [ "$1" = "$2" ] && { echo SAME; return; }
      local -a a b
      read -r -a a <<<"$(echo "$1" | tr '\n' ' ')"
      read -r -a b <<<"$(echo "$2" | tr '\n' ' ')"
      local i=0
      while [ $i -lt ${#a[@]} ] && [ $i -lt ${#b[@]} ] && [ "${a[$i]}" = "${b[$i]}" ]; do i=$((i + 1)); done
      echo "DIFFERENT from word $((i + 1))"
    }
    margins() { python3 scripts/device/logprob_diff.py "$OUT/ranks_$1.err" "$OUT/ranks_$2.err" | tee -a "$OUT/ranks.txt"; }
    ref=$(gen global1 1 --attention global)
    echo "global on 1 rank: $ref" | tee "$OUT/ranks.txt"
    for np in 2 4; do
      one=$(gen "star1x$np" 1 --attention star --n-blocks "$np")
      got=$(gen "star$np" "$np" --attention star)
      echo "star with $np blocks on 1 rank: $one" | tee -a "$OUT/ranks.txt"
      echo "star on $np ranks vs star with $np blocks on 1 rank: $(verdict "$got" "$one") | $got" | tee -a "$OUT/ranks.txt"
      [ "$got" = "$one" ] || margins "star$np" "star1x$np"
      got=$(gen "exact$np" "$np" --attention exact)
      echo "exact on $np ranks vs global on 1 rank: $(verdict "$got" "$ref") | $got" | tee -a "$OUT/ranks.txt"
      [ "$got" = "$ref" ] || margins "exact$np" global1
    done
    grep -i "nccl\|warn\|error" "$OUT/ranks.log" | sort | uniq -c | head -20
    ;;
  eval)
    [ -f "$MODEL" ] || { echo "eval: no model"; continue; }
    echo "== star accuracy on the CUDA backend"
    PYTHONUNBUFFERED=1 timeout "${EVAL_TIMEOUT:-240}" python3 evals/star_accuracy.py --backend cuda \
      --binary "$BIN/starserve" --model "$MODEL" --lengths ${EVAL_LENGTHS:-4096 8192} --samples "${EVAL_SAMPLES:-2}" \
      --configs ${EVAL_CONFIGS:-global star-1/4 star-1/8} --ranks 2 --out "$OUT/eval.jsonl" 2>&1 | tail -30
    ;;
  bench)
    L=${BENCH_LENGTHS:-16384,32768,65536,131072}
    N=${BENCH_LAYERS:-32}
    M=${BENCH_MODES:-global,star}
    echo "== model bench (layers $N, lengths $L)"
    timeout 420 "$BIN/model_bench" --layers "$N" --lengths "$L" --modes "$M" --prefill-kernel "${BENCH_PREFILL:-auto}" |
      tee "$OUT/model_bench.jsonl"
    echo "== peers"
    LD_LIBRARY_PATH="$STARSERVE_BASE_LD_LIBRARY_PATH" PYTHONUNBUFFERED=1 timeout 300 python3 bench/gpu/model_peers.py --layers "$N" --lengths "$L" |
      tee "$OUT/model_peers.jsonl"
    python3 bench/gpu/summarize_model.py "$OUT/model_bench.jsonl" "$OUT/model_peers.jsonl" | tee "$OUT/model_summary.txt"
    ;;
  kvbench)
    L=${BENCH_LENGTHS:-16384,32768}
    N=${BENCH_LAYERS:-32}
    M=${BENCH_MODES:-global,star}
    echo "== KV shifting vs Llama, 8B shape (layers $N, lengths $L, modes $M)"
    timeout 420 "$BIN/model_bench" --arch both --layers "$N" --lengths "$L" --modes "$M" --decode 32 |
      tee "$OUT/kvshift_bench.jsonl"
    python3 bench/gpu/summarize_model.py "$OUT/kvshift_bench.jsonl" /dev/null | tee "$OUT/kvshift_summary.txt"
    ;;
  serve)
    [ -f "$MODEL" ] || { echo "serve: no model"; continue; }
    echo "== gRPC server on the CUDA backend, ${SERVE_RANKS:-1} rank(s), $(nvidia-smi -L | wc -l) GPU(s)"
    PORT=50151
    mpirun --allow-run-as-root --oversubscribe -np "${SERVE_RANKS:-1}" -x NCCL_NVLS_ENABLE -x LD_LIBRARY_PATH "$BIN/starserve" serve \
      --model "$MODEL" --backend cuda --port $PORT --attention star >"$OUT/serve.log" 2>&1 &
    SERVER=$!
    C=("$BIN/starctl" --address 127.0.0.1:$PORT)
    for _ in $(seq 1 120); do "${C[@]}" --timeout 2 health --ready >/dev/null 2>&1 && break; sleep 0.5; done
    "${C[@]}" --timeout 5 health --ready 2>&1 | tee "$OUT/serve.txt"
    python3 - /tmp/passkey.txt <<'PY'
import sys
filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
open(sys.argv[1], "w").write(filler * 60 + "The pass key is 48213. Remember it. 48213 is the pass key. " + filler * 60)
PY
    {
      echo "-- chat"
      "${C[@]}" --timeout 60 chat "What is the capital of France?" --max-tokens 32 --temperature 0
      echo "-- chat over a ~2.7K-token document, star attention"
      "${C[@]}" --timeout 60 chat --context-file /tmp/passkey.txt "What is the pass key? Answer with the number only." \
        --max-tokens 16 --temperature 0 --attention star
      echo "-- bad parameter (top_p 1.5): must be refused"
      "${C[@]}" --timeout 60 chat "Hello" --top-p 1.5; echo "rc=$?"
      echo "-- deadline of 1 ms: must end with DEADLINE_EXCEEDED"
      "${C[@]}" --timeout 0.001 chat "Write a long story." --max-tokens 500; echo "rc=$?"
      echo "-- sampled chat (temperature 0.7, seed 1), then the same again: same text"
      "${C[@]}" --timeout 60 chat "Name three colours." --max-tokens 24 --temperature 0.7 --seed 1
      "${C[@]}" --timeout 60 chat "Name three colours." --max-tokens 24 --temperature 0.7 --seed 1
      echo "-- still serving"
      "${C[@]}" --timeout 60 chat "What is 2 + 2?" --max-tokens 16 --temperature 0
    } 2>&1 | tee -a "$OUT/serve.txt"
    kill $SERVER; wait $SERVER 2>/dev/null
    grep -i "ranks\|nccl\|error\|warn" "$OUT/serve.log" | head -10
    ;;
  chunked)
    [ -f "$MODEL" ] || { echo "chunked: no model"; continue; }
    [ -x "$BIN/starctl" ] ||
      { echo "chunked: no $BIN/starctl (the build has no gRPC)"; continue; }
    CB=(python3 bench/chunked_prefill_bench.py --starserve "$BIN/starserve" --starctl "$BIN/starctl" --model "$MODEL")
    if [[ " ${CHUNKED_BACKENDS:-cpu cuda} " == *" cpu "* ]]; then
      echo "== chunked prefill, CPU backend, 2 ranks ($(nproc) cores)"
      # A 4096-token context took ~20 s of phase 1 there (2 ranks x 8 threads): 1024 keeps the step short.
      # shellcheck disable=SC2086  # the *_ARGS are lists of flags
      PYTHONUNBUFFERED=1 timeout 420 "${CB[@]}" --ranks 2 --server-arg=--backend=cpu \
        --server-arg=--threads=$(($(nproc) / 2)) --long-tokens 1024 --cancel-repeats 2 ${CHUNKED_CPU_ARGS:-} \
        >"$OUT/chunked_cpu.jsonl" 2>"$OUT/chunked_cpu.err"
      echo "exit $?"; tail -12 "$OUT/chunked_cpu.err"
    fi
    if [[ " ${CHUNKED_BACKENDS:-cpu cuda} " == *" cuda "* ]]; then
      echo "== chunked prefill, CUDA backend, 1 rank"
      # shellcheck disable=SC2086
      PYTHONUNBUFFERED=1 timeout 420 "${CB[@]}" --ranks 1 --server-arg=--backend=cuda \
        --long-tokens 2048 8000 ${CHUNKED_CUDA_ARGS:-} >"$OUT/chunked_cuda.jsonl" 2>"$OUT/chunked_cuda.err"
      echo "exit $?"; tail -14 "$OUT/chunked_cuda.err"
    fi
    ;;
  load)
    [ -f "$MODEL" ] || { echo "load: no model"; continue; }
    [ -x "$BIN/starctl" ] || { echo "load: no $BIN/starctl (the build has no gRPC)"; continue; }
    echo "== serving load, CUDA backend, 1 rank"
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout 480 python3 bench/load_bench.py --starserve "$BIN/starserve" --starctl "$BIN/starctl" \
      --model "$MODEL" --ranks 1 --concurrency ${LOAD_CONCURRENCY:-1 8 64 256} --requests 2 --max-tokens 128 \
      --processes "${LOAD_PROCESSES:-8}" \
      --server-arg=--backend=cuda --server-arg=--max-running=256 --server-arg=--max-queue=512 \
      >"$OUT/load_cuda.jsonl" 2>"$OUT/load_cuda.err"
    echo "exit $?"; tail -5 "$OUT/load_cuda.err"
    python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(r["concurrency"], r["tokens_per_s"], r.get("itl_ms_p50"), r.get("ttft_ms_p99"), r.get("engine_ms_per_decode_step"), r.get("sequences_per_decode_step"))' "$OUT/load_cuda.jsonl"
    ;;
  batch)
    echo "== decode steps of S sequences together: SmolLM2-135M's shape (random weights), 1 rank, CUDA graphs"
    for s in ${BATCH_SEQS:-1 8 64 256}; do
      timeout 120 "$BIN/model_bench" --shape smollm2 --seqs "$s" --lengths "${BATCH_CONTEXT:-256}" --decode "${BATCH_DECODE:-32}" \
        2>>"$OUT/decode_batch.err" | grep '"decode_batch"' | tail -1 | tee -a "$OUT/decode_batch.jsonl"
      timeout 120 python3 bench/gpu/model_peers.py --shape smollm2 --seqs "$s" --lengths "${BATCH_CONTEXT:-256}" \
        --decode "${BATCH_DECODE:-32}" 2>>"$OUT/decode_batch.err" | tail -1 | tee -a "$OUT/decode_batch.jsonl"
    done
    ;;
  profile)
    echo "== where the host's time goes: 256 sequences decoded together (SmolLM2-135M's shape), sampled"
    gcc -O1 -shared -fPIC -o /tmp/starserve-sampler.so scripts/device/profile/sampler.c || continue
    rm -f /tmp/starserve-prof.*
    PROF_OUT=/tmp/starserve-prof LD_PRELOAD=/tmp/starserve-sampler.so timeout 120 "$BIN/model_bench" --shape smollm2 \
      --seqs "${PROFILE_SEQS:-256}" --lengths 256 --decode 1000 2>/dev/null | grep '"decode_batch"' | tail -1
    python3 scripts/device/profile/report.py "$(ls /tmp/starserve-prof.* | head -1)" "$BIN/model_bench" >"$OUT/host_profile.txt"
    head -45 "$OUT/host_profile.txt"
    ;;
  serveprofile)
    # Where the serving host's time goes under load: the server (CUDA, 1 rank) runs under the sampling profiler
    # while load_bench drives SERVE_PROFILE_STREAMS streams from LOAD_PROCESSES client processes; SIGTERM ends it
    # normally, so the sampler writes its file.
    [ -f "$MODEL" ] || { echo "serveprofile: no model"; continue; }
    [ -x "$BIN/starctl" ] || { echo "serveprofile: no $BIN/starctl (the build has no gRPC)"; continue; }
    gcc -O1 -shared -fPIC -o /tmp/starserve-sampler.so scripts/device/profile/sampler.c || continue
    rm -f /tmp/starserve-sprof.*
    SP_PORT=$((50000 + RANDOM % 5000)); SP_MPORT=$((SP_PORT + 1))
    PROF_OUT=/tmp/starserve-sprof LD_PRELOAD=/tmp/starserve-sampler.so "$BIN/starserve" serve --model "$MODEL" \
      --backend cuda --host 127.0.0.1 --port "$SP_PORT" --metrics-port "$SP_MPORT" --max-running 256 \
      --max-queue 512 --log-level warn >"$OUT/serveprofile_server.log" 2>&1 &
    SP_PID=$!
    for _ in $(seq 120); do "$BIN/starctl" --address "127.0.0.1:$SP_PORT" health --ready >/dev/null 2>&1 && break; sleep 0.5; done
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/load_bench.py --address "127.0.0.1:$SP_PORT" \
      --metrics "127.0.0.1:$SP_MPORT" --concurrency "${SERVE_PROFILE_STREAMS:-256}" --requests 2 --max-tokens 128 \
      --processes "${LOAD_PROCESSES:-8}" >"$OUT/serveprofile_load.jsonl" 2>"$OUT/serveprofile_load.err"
    tail -3 "$OUT/serveprofile_load.err"
    kill -TERM "$SP_PID"; wait "$SP_PID"
    python3 scripts/device/profile/report.py "$(ls /tmp/starserve-sprof.* | head -1)" "$BIN/starserve" \
      >"$OUT/serve_host_profile.txt"
    head -60 "$OUT/serve_host_profile.txt"
    ;;
  load8b)
    [ -x "$BIN/starctl" ] || { echo "load8b: no $BIN/starctl (the build has no gRPC)"; continue; }
    GG=/tmp/starserve-random-8b.gguf
    if [ ! -f "$GG" ]; then
      echo "== writing a random-weight Llama-3-8B-shaped GGUF (scripts/make_random_gguf.py)"
      rm -rf /tmp/gguf-py && python3 -m zipfile -e third_party/wheels/gguf/gguf-*.whl /tmp/gguf-py || continue
      PYTHONPATH=/tmp/gguf-py timeout 400 python3 scripts/make_random_gguf.py --shape 8b \
        --tokenizer-from "${TOKENIZER_GGUF:-.carry/tok/smollm2-tokenizer.gguf}" --out "$GG" || { rm -f "$GG"; continue; }
    fi
    echo "== serving load, the random 8B-shaped GGUF, CUDA backend, 1 rank"
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout 480 python3 bench/load_bench.py --starserve "$BIN/starserve" --starctl "$BIN/starctl" \
      --model "$GG" --ranks 1 --concurrency ${LOAD8B_CONCURRENCY:-1 8 64} --requests 2 --max-tokens 128 \
      --processes "${LOAD_PROCESSES:-8}" --server-arg=--backend=cuda --server-arg=--max-running=256 \
      --server-arg=--max-queue=512 >"$OUT/load_8b_cuda.jsonl" 2>"$OUT/load_8b_cuda.err"
    echo "exit $?"; tail -6 "$OUT/load_8b_cuda.err"
    ;;
  llamaload)
    # llama.cpp's CUDA server next to starserve's HTTP API, the same GGUF, clients and request mix, one call.
    GG=${LLAMA_LOAD_MODEL:-$MODEL}
    [ -f "$GG" ] || { echo "llamaload: no $GG"; continue; }
    LS=/tmp/llama.cpp/build/bin/llama-server
    if [ ! -x "$LS" ]; then
      echo "== building llama.cpp's llama-server with CUDA for sm_90 (.carry/llamacpp: llama-cpp-python's vendored tree)"
      rm -rf /tmp/llama.cpp && tar xzf .carry/llamacpp/llama.cpp-*.tar.gz -C /tmp || continue
      (cd /tmp/llama.cpp && cmake -S . -B build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCMAKE_BUILD_TYPE=Release \
        >"$OUT/llama_configure.log" 2>&1 &&
        timeout 540 cmake --build build -j "$(nproc)" --target llama-server >"$OUT/llama_build.log" 2>&1) ||
        { tail -20 "$OUT/llama_build.log"; continue; }
    fi
    LC=${LLAMA_LOAD_CONCURRENCY:-1 8 64}
    maxc=$(echo "$LC" | tr ' ' '\n' | sort -n | tail -1)
    "$LS" -m "$GG" -ngl 999 --host 127.0.0.1 --port 18111 --parallel "$maxc" -c $((maxc * 256)) \
      >"$OUT/llama_server.log" 2>&1 &
    lpid=$!
    for _ in $(seq 1 180); do
      python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
        http://127.0.0.1:18111/health 2>/dev/null && break
      sleep 1
    done
    echo "== llama.cpp's llama-server (CUDA), $GG"
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/load_bench.py --http-address 127.0.0.1:18111 --concurrency $LC \
      --requests 2 --max-tokens 128 --processes "${LOAD_PROCESSES:-8}" --prompt-vocab 49152 \
      >"$OUT/load_llamacpp.jsonl" 2>"$OUT/load_llamacpp.err"
    echo "exit $?"; tail -5 "$OUT/load_llamacpp.err"
    kill "$lpid" 2>/dev/null; wait "$lpid" 2>/dev/null
    echo "== starserve's HTTP API (CUDA, 1 rank), the same file and mix"
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout 300 python3 bench/load_bench.py --api http --starserve "$BIN/starserve" \
      --starctl "$BIN/starctl" --model "$GG" --ranks 1 --concurrency $LC --requests 2 --max-tokens 128 \
      --processes "${LOAD_PROCESSES:-8}" --server-arg=--backend=cuda --server-arg=--max-running=256 \
      --server-arg=--max-queue=512 >"$OUT/load_starserve_http.jsonl" 2>"$OUT/load_starserve_http.err"
    echo "exit $?"; tail -5 "$OUT/load_starserve_http.err"
    ;;
  reuse)
    [ -f "$MODEL" ] || { echo "reuse: no model"; continue; }
    [ -x "$BIN/starctl" ] || { echo "reuse: no $BIN/starctl (the build has no gRPC)"; continue; }
    echo "== context reuse, CUDA backend, 1 rank"
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout 480 python3 bench/context_reuse_bench.py --starserve "$BIN/starserve" \
      --starctl "$BIN/starctl" --model "$MODEL" --ranks 1 --lengths ${REUSE_LENGTHS:-8192 32768 131072} \
      --server-arg=--backend=cuda --server-arg=--kv-memory-mb=16384 >"$OUT/context_reuse.jsonl" 2>"$OUT/context_reuse.err"
    echo "exit $?"; grep -v "^server:" "$OUT/context_reuse.err" | tail -14
    ;;
  kvshift)
    KD=${KVSHIFT_DIR:-.carry/kvshift}
    [ -d "$KD/kvshift-6l" ] || { echo "kvshift: no $KD/kvshift-6l"; continue; }
    echo "== KV shifting: GPU tests"
    for t in gpu_kernel_tests gpu_model_tests; do
      [ -x "$BIN/$t" ] && "$BIN/$t" --gtest_filter='*KvShift*:*Kvshift*:*KVShift*' 2>&1 | tail -25 | tee -a "$OUT/kvshift_tests.txt"
    done
    echo "== KV shifting: perplexity through gRPC (val.bin, windows of 512)"
    PORT=50161
    for m in kvshift-6l llama-6l; do
      for be in ${KVSHIFT_BACKENDS:-cuda cpu}; do
        mpirun --allow-run-as-root --oversubscribe -np 1 -x LD_LIBRARY_PATH "$BIN/starserve" serve --model "$KD/$m" \
          --backend $be --port $PORT --attention global --kv-memory-mb 2048 >"$OUT/kvshift_serve_${m}_$be.log" 2>&1 &
        SERVER=$!
        for _ in $(seq 1 120); do "$BIN/starctl" --address 127.0.0.1:$PORT --timeout 2 health --ready >/dev/null 2>&1 && break; sleep 0.5; done
        for mode in "--attention global" "--attention star --block-size 128 --anchor-size 128"; do
          # shellcheck disable=SC2086
          r=$(timeout 300 python3 evals/perplexity.py --address 127.0.0.1:$PORT --val-bin "$KD/val.bin" --seq 512 \
            --windows 1000 $mode 2>>"$OUT/kvshift_ppl.err")
          echo "{\"model\": \"$m\", \"backend\": \"$be\", \"result\": ${r:-null}}" | tee -a "$OUT/kvshift_ppl.jsonl"
        done
        kill $SERVER; wait $SERVER 2>/dev/null
      done
    done
    ;;
  attamba)
    AD=${ATTAMBA_DIR:-.carry/attamba}
    echo "== Attamba: GPU tests"
    for t in gpu_kernel_tests gpu_model_tests; do
      [ -x "$BIN/$t" ] && "$BIN/$t" --gtest_filter='*Ssm*:*Attamba*' 2>&1 | tail -25 | tee -a "$OUT/attamba_tests.txt"
    done
    [ -f "$AD/val.bin" ] || { echo "attamba: no $AD/val.bin"; continue; }
    echo "== Attamba: perplexity through gRPC on the CUDA backend (val.bin, windows of 512)"
    PORT=50171
    for m in ${ATTAMBA_MODELS:-attamba-6l-p4-l32 attamba-6l-p8-l16}; do
      [ -d "$AD/$m" ] || { echo "attamba: no $AD/$m"; continue; }
      mpirun --allow-run-as-root --oversubscribe -np 1 -x LD_LIBRARY_PATH "$BIN/starserve" serve --model "$AD/$m" \
        --backend cuda --port $PORT --attention global --kv-memory-mb 2048 >"$OUT/attamba_serve_$m.log" 2>&1 &
      SERVER=$!
      for _ in $(seq 1 120); do "$BIN/starctl" --address 127.0.0.1:$PORT --timeout 2 health --ready >/dev/null 2>&1 && break; sleep 0.5; done
      for mode in "--attention global" "--attention star --block-size 128 --anchor-size 128"; do
        # shellcheck disable=SC2086
        r=$(timeout 300 python3 evals/perplexity.py --address 127.0.0.1:$PORT --val-bin "$AD/val.bin" --seq 512 \
          --windows 1000 $mode 2>>"$OUT/attamba_ppl.err")
        echo "{\"model\": \"$m\", \"backend\": \"cuda\", \"result\": ${r:-null}}" | tee -a "$OUT/attamba_ppl.jsonl"
      done
      kill $SERVER; wait $SERVER 2>/dev/null
    done
    ;;
  lnfree)
    LD=${LNFREE_DIR:-.carry/corpus}
    LO=/tmp/lnfree-out
    echo "== LayerNorm-free GPT-2: GPU tests"
    "$BIN/gpu_kernel_tests" --gtest_filter='GpuGpt2Ops.*' 2>&1 | tail -12 | tee "$OUT/lnfree_tests.txt"
    "$BIN/gpu_model_tests" --gtest_filter='LnFreeGoldenGpu.*:*FamilyGoldenGpu*gpt2*' 2>&1 | tail -14 |
      tee -a "$OUT/lnfree_tests.txt"
    if [ ! -f "$LO/results.json" ]; then
      [ -f "$LD/train.bin" ] || { echo "lnfree: no corpus in $LD"; continue; }
      echo "== training (scripts/device/train_lnfree.sh)"
      LD_LIBRARY_PATH="$STARSERVE_BASE_LD_LIBRARY_PATH" timeout 420 bash scripts/device/train_lnfree.sh "$LD" "$LO" \
        /tmp/starref-lnfree-runs 2>&1 | tail -8
      for t in "$LO"/*.tar; do tar xf "$t" -C "$LO"; done
    fi
    cp "$LO"/*.tar "$LO/results.json" "$LO/runs.tar.gz" "$OUT/" 2>/dev/null
    mkdir -p "$OUT/lnfree_maps"
    PORT=50181
    for m in gpt2-6l-base gpt2-lnfree-6l gpt2-lnfree-ent-6l; do
      [ -d "$LO/$m" ] || { echo "lnfree: no $LO/$m"; continue; }
      for be in cuda cpu; do
        np=1; [ $be = cpu ] && np=2
        mpirun --allow-run-as-root --oversubscribe -np $np -x LD_LIBRARY_PATH "$BIN/starserve" serve --model "$LO/$m" \
          --backend $be --port $PORT --attention global >"$OUT/lnfree_serve_${m}_$be.log" 2>&1 &
        SERVER=$!
        for _ in $(seq 1 120); do "$BIN/starctl" --address 127.0.0.1:$PORT --timeout 2 health --ready >/dev/null 2>&1 && break; sleep 0.5; done
        LD_LIBRARY_PATH="$STARSERVE_BASE_LD_LIBRARY_PATH" timeout 300 python3 evals/entropy_map.py \
          --address 127.0.0.1:$PORT --val-bin "$LD/val.bin" --seq 127 --windows 32 --modes global exact star \
          --block-size 32 --anchor-size 32 --reference "$LO/$m" --label "$m/$be" \
          --out "$OUT/lnfree_maps/${m}_$be.json" 2>>"$OUT/lnfree_entropy.err" |
          python3 -c 'import json,sys
for l in sys.stdin:
    d=json.loads(l); print(json.dumps({k: d.get(k) for k in ("label","mode","windows","query_tokens","max_abs_diff","mean_abs_diff","overload_fraction","collapse_fraction","server_mean_per_layer")}))' |
          tee -a "$OUT/lnfree_entropy.jsonl"
        kill $SERVER; wait $SERVER 2>/dev/null
        PORT=$((PORT + 1))
      done
    done
    ;;
  gemma)
    [ -f "$GEMMA" ] || { echo "gemma: not here yet (parts: $(ls /tmp/starserve-gemma 2>/dev/null | tr '\n' ' '))"; continue; }
    echo "== Gemma-3-270M on the GPU against transformers (Gemma3Gpu.*)"
    "$BIN/gpu_model_tests" --gtest_filter='Gemma3Gpu.*' 2>&1 | tee "$OUT/gemma_gpu.txt" | grep -E "gemma3 gpu|OK|FAIL|PASSED"
    ;;
  lifecycle)
    [ -f "$MODEL" ] || { echo "lifecycle: no model"; continue; }
    echo "== server lifecycle on the CUDA backend (2 ranks sharing the GPU)"
    LIFECYCLE_SERVER_ARGS="--backend cuda" timeout 600 bash tests/e2e/lifecycle_e2e.sh "$BIN" "$MODEL" 2>&1 |
      tee "$OUT/lifecycle.txt" | grep -v "^PASS"
    echo "lifecycle: exit ${PIPESTATUS[0]}"
    ;;
  esac
done
