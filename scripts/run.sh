#!/usr/bin/env bash
# Set-up (packages, model, build), then start the server on the default model (one rank per GPU
# when the build has CUDA and GPUs are visible, else 2 CPU ranks; STARSERVE_RANKS overrides)
# and show a real completion through the gRPC client: a document
# encoded with Star Attention across the ranks, and a question answered over the sharded KV.
# The server keeps running afterwards; the last lines say how to stop it.
source "$(dirname "$0")/common.sh"
install_packages
fetch_models
ensure_cuda_toolkit if-gpu
build
# One rank per GPU when the build has the CUDA backend and GPUs are visible; else 2 CPU ranks.
GPUS=0
if command -v nvidia-smi >/dev/null 2>&1 && grep -q "CUDA.*✓\|✓ CUDA" "$BUILD_DIR/configure.log" 2>/dev/null; then
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
fi
if [ "${GPUS:-0}" -gt 0 ]; then RANKS="${STARSERVE_RANKS:-$GPUS}"; else RANKS="${STARSERVE_RANKS:-2}"; fi
PORT="${STARSERVE_PORT:-50051}"
LOG="$REPO_ROOT/build/server.log"
export OMPI_MCA_mpi_yield_when_idle=1
if "$BUILD_DIR/bin/starctl" --address "127.0.0.1:$PORT" --timeout 2 health --ready >/dev/null 2>&1; then
  log "a server already answers on port $PORT; using it"
else
  log "starting: mpirun -np $RANKS starserve serve --port $PORT (log: $LOG)"
  nohup mpirun --oversubscribe --allow-run-as-root -np "$RANKS" "$BUILD_DIR/bin/starserve" serve \
    --model "$DEFAULT_MODEL" --port "$PORT" --attention star >"$LOG" 2>&1 &
  echo $! >"$BUILD_DIR/server.pid"
  for _ in $(seq 1 240); do
    "$BUILD_DIR/bin/starctl" --address "127.0.0.1:$PORT" --timeout 2 health --ready >/dev/null 2>&1 && break
    if ! kill -0 "$(cat "$BUILD_DIR/server.pid")" 2>/dev/null; then cat "$LOG"; exit 1; fi
    sleep 0.5
  done
fi
S=("$BUILD_DIR/bin/starctl" --address "127.0.0.1:$PORT" --timeout 600)
log "starctl chat \"What is the capital of France?\""
"${S[@]}" chat "What is the capital of France?" --max-tokens 32 --temperature 0
# A document hiding a pass key: the context is split into blocks across the ranks (Star Attention
# phase 1), the question attends to every block (phase 2).
ctx="$(mktemp)"
python3 - "$ctx" <<'PY'
import sys
filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
open(sys.argv[1], "w").write(filler * 12 + "The pass key is 48213. Remember it. 48213 is the pass key. " + filler * 12)
PY
log "starctl chat --context-file <600-token document> \"What is the pass key? Answer with the number only.\""
"${S[@]}" chat --context-file "$ctx" "What is the pass key? Answer with the number only." --max-tokens 16 \
  --temperature 0 --attention star
rm -f "$ctx"
log "the server is still running on port $PORT with $RANKS ranks"
log "  try:  $BUILD_DIR/bin/starctl --address 127.0.0.1:$PORT stream \"Once upon a time\" --max-tokens 64"
log "  stop: kill \$(cat $BUILD_DIR/server.pid)"
