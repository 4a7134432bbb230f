#!/usr/bin/env bash
# A request whose Star Attention layout the model cannot run is refused by rank 0 with the reason, before any rank
# runs it, and the server keeps serving: real `mpirun -np 2 starserve serve` on a KV-shifting model (the tiny golden,
# tests/golden/kvshift/hf), real starctl. The refused layout: star with blocks so short that rank 0 holds several
# blocks and hands its last token on (the KV-shifting halo needs each earlier rank to hold one block).
# Usage: layout_refusal_e2e.sh BIN_DIR MODEL_DIR. Every wait is bounded; the server is stopped on exit.
set -uo pipefail
BIN="$1" MODEL="$2"
WORK="$(mktemp -d)"
MPI_PID=""
cleanup() {
  stop_pid "$MPI_PID" 40 0.25
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

# The golden folder holds the weights only: give it a byte-level tokenizer of its 256 ids (every byte one token, no
# merges; the GPT-2 byte-to-character table), so the server loads it. Prompts are token ids anyway.
mkdir -p "$WORK/model"
cp "$MODEL"/config.json "$MODEL"/model.safetensors "$WORK/model/"
python3 "$(dirname "$0")/../../scripts/golden/byte_level_tokenizer.py" "$WORK/model/tokenizer.json"
MODEL="$WORK/model"
PORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --backend cpu --host 127.0.0.1 \
  --port "$PORT" --log-level warn >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 120)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'

IDS=$(seq 10 129 | paste -sd,)  # 120 tokens: the last 30 are the query
"${CTL[@]}" complete --token-ids "$IDS" --attention star --block-size 16 --max-tokens 2 --temperature 0 \
  >"$WORK/bad.out" 2>"$WORK/bad.err"
check "star with 16-token blocks: refused" '[ $? != 0 ]'
check "the reason is given (UNIMPLEMENTED, the halo rule)" \
  'grep -q "UNIMPLEMENTED.*hands its last token" "$WORK/bad.err"'
check "both ranks still running" 'kill -0 "$MPI_PID" 2>/dev/null && [ "$(rank_pids | wc -l)" = 2 ]'
"${CTL[@]}" complete --token-ids "$IDS" --attention star --max-tokens 2 --temperature 0 >"$WORK/good.out" 2>"$WORK/good.err"
check "the next request (one block per rank) completes" '[ $? = 0 ] && grep -q "^\[finish length\]" "$WORK/good.err"'
check "health still SERVING" '"${CTL[@]}" health --ready >/dev/null 2>&1'
grep -q "ending the job" "$WORK/server.log" && fail "a rank ended the job:" && cat "$WORK/server.log"
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
