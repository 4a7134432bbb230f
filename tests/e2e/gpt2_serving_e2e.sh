#!/usr/bin/env bash
# GPT-2 served end to end: real `mpirun -np 2 starserve serve` on the tiny GPT-2 golden (tests/golden/gpt2/hf: learned
# positions, n_positions 128), real starctl over gRPC. Greedy continuations of the golden's prompts in global, exact
# and star attention equal transformers' token for token (golden.json), and the first token's log-probability equals
# the one of the golden's logits; a prompt that needs more than the 128 learned positions is refused with
# INVALID_ARGUMENT naming the limit while one that fits exactly completes; a server asked for a longer context than
# the position table refuses to start.
# Usage: gpt2_serving_e2e.sh BIN_DIR GOLDEN_DIR (tests/golden/gpt2). Every wait is bounded; the server is stopped on exit.
set -uo pipefail
BIN="$1" GOLDEN="$2"
WORK="$(mktemp -d)"
MPI_PID=""
cleanup() {
  stop_pid "$MPI_PID" 40 0.25
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

# The golden holds the weights only: a byte-level tokenizer of its 256 ids (every byte one token, no merges; the
# GPT-2 byte-to-character table) lets the server load it. Prompts are token ids.
mkdir -p "$WORK/model"
cp "$GOLDEN"/hf/config.json "$GOLDEN"/hf/model.safetensors "$WORK/model/"
python3 "$(dirname "$0")/../../scripts/golden/byte_level_tokenizer.py" "$WORK/model/tokenizer.json"
# golden FIELD INDEX: prompt ids / generated ids (comma-separated) of greedy case INDEX, or the expected log-probability
# of its first generated token from the golden's last-position logits of the same prompt.
golden() {
  python3 - "$GOLDEN/golden.json" "$1" "$2" <<'PY'
import json, math, sys
g = json.load(open(sys.argv[1]))
r = g["greedy"][int(sys.argv[3])]
if sys.argv[2] == "first_logprob":
    logits = next(p["last_logits"] for p in g["prompts"] if p["token_ids"] == r["prompt_ids"])
    m = max(logits)
    print(logits[r["generated_ids"][0]] - m - math.log(sum(math.exp(v - m) for v in logits)))
else:
    print(",".join(str(i) for i in r[sys.argv[2]]))
PY
}
# The generated ids starctl reports with --logprobs 1 (stderr "logprob <value> <id> ..."), comma-separated.
generated() { sed -n 's/^logprob *[-0-9.]* *\([0-9]*\) .*/\1/p' "$1" | paste -sd,; }
first_logprob() { sed -n 's/^logprob *\([-0-9.]*\) .*/\1/p' "$1" | head -1; }

PORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$WORK/model" --backend cpu \
  --host 127.0.0.1 --port "$PORT" --log-level warn >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 120)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'
kill -0 "$MPI_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }
check "GetModelInfo: gpt2, context 128" \
  '"${CTL[@]}" info >"$WORK/info.json" 2>&1 && grep -q "gpt2" "$WORK/info.json" && grep -q "\"max_context\": *128" "$WORK/info.json"'

for i in 0 1; do
  PROMPT=$(golden prompt_ids $i)
  WANT=$(golden generated_ids $i)
  N=$(echo "$WANT" | tr ',' '\n' | grep -c .)
  for mode in global exact star; do
    "${CTL[@]}" complete --token-ids "$PROMPT" --attention $mode --max-tokens "$N" --temperature 0 --logprobs 1 \
      >"$WORK/$mode$i.out" 2>"$WORK/$mode$i.err"
    check "prompt $i, $mode: the $N greedy tokens of transformers" '[ "$(generated "$WORK/$mode$i.err")" = "$WANT" ]'
  done
  LP_WANT=$(golden first_logprob $i)
  LP_GOT=$(first_logprob "$WORK/global$i.err")
  # starctl prints 4 decimals; fp32 against fp32 agrees far closer than that.
  check "prompt $i: first token's logprob $LP_GOT = transformers' $LP_WANT" \
    'python3 -c "import sys; sys.exit(abs(float(sys.argv[1]) - float(sys.argv[2])) > 1e-4)" "$LP_GOT" "$LP_WANT"'
done

# 128 positions: 127 prompt tokens + 1 generated fit; 128 + 1 and 120 + 16 do not.
IDS127=$(seq 0 126 | awk '{print ($1 * 37) % 256}' | paste -sd,)
IDS128=$(seq 0 127 | awk '{print ($1 * 37) % 256}' | paste -sd,)
"${CTL[@]}" complete --token-ids "$IDS127" --max-tokens 1 --temperature 0 >"$WORK/fit.out" 2>"$WORK/fit.err"
check "127 prompt tokens + 1: completes" '[ $? = 0 ] && grep -q "^\[finish length\]" "$WORK/fit.err"'
"${CTL[@]}" complete --token-ids "$IDS128" --max-tokens 1 --temperature 0 >"$WORK/long.out" 2>"$WORK/long.err"
check "128 prompt tokens + 1: refused" '[ $? != 0 ]'
check "the reason: INVALID_ARGUMENT naming the limit of 128" \
  'grep -q "INVALID_ARGUMENT" "$WORK/long.err" && grep -q "128" "$WORK/long.err"'
"${CTL[@]}" complete --token-ids "$(seq 0 119 | paste -sd,)" --max-tokens 16 >"$WORK/long2.out" 2>"$WORK/long2.err"
check "120 prompt tokens + 16: refused with INVALID_ARGUMENT" '[ $? != 0 ] && grep -q "INVALID_ARGUMENT" "$WORK/long2.err"'
check "health still SERVING" '"${CTL[@]}" health --ready >/dev/null 2>&1'
grep -q "ending the job" "$WORK/server.log" && fail "a rank ended the job:" && cat "$WORK/server.log"
stop_pid "$MPI_PID" 40 0.25
MPI_PID=""

# A context longer than the position table cannot be served: the server refuses to start, naming both.
PORT=$(free_port)
timeout 60 mpirun --oversubscribe --allow-run-as-root -np 1 "$BIN/starserve" serve --model "$WORK/model" \
  --backend cpu --host 127.0.0.1 --port "$PORT" --max-context 256 --log-level warn >"$WORK/ctx.log" 2>&1
rc=$?
check "--max-context 256: the server exits with an error (rc $rc)" '[ $rc != 0 ] && [ $rc != 124 ]'
check "the reason names 256 and the 128 learned positions" 'grep -q "256 exceeds the 128 learned positions" "$WORK/ctx.log"'
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
