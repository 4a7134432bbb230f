#!/usr/bin/env bash
# End-to-end test of prompt log-probabilities through gRPC: real `mpirun -np 2 starserve serve` on the default model
# (CPU backend), real starctl. A token-id prompt is scored in global, exact and star (one block holding the whole
# context, so all three are exact) from unary and streaming RPCs: one entry per prompt token after the first, each
# naming that token, the same perplexity everywhere; a text prompt is scored too; out-of-range counts are refused with
# INVALID_ARGUMENT. Where python3 has grpcio, evals/perplexity.py measures a val.bin (uint16 token ids) of the same
# windows and must report the perplexity starctl's entries give; without grpcio that part says SKIP.
# Usage: prompt_logprobs_e2e.sh BIN_DIR MODEL. Every wait is bounded; the server is stopped on exit.
set -uo pipefail
BIN="$1" MODEL="$2"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="$(mktemp -d)"
MPI_PID=""
cleanup() {
  stop_pid "$MPI_PID" 40 0.25
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

PORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --host 127.0.0.1 \
  --port "$PORT" --log-level warn >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 300)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'
kill -0 "$MPI_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }

TEXT="The harbour master wrote every evening: the storms, the late ships, the price of rope and the long argument \
with the town about a new lighthouse on the northern cliff, which was finally built in the spring."
IDS=$("${CTL[@]}" tokenize --ids-only "$TEXT" |
  python3 -c "import json, sys; print(','.join(str(i) for i in json.load(sys.stdin)['token_ids']))")
N=$(echo "$IDS" | tr ',' '\n' | grep -c .)
check "tokenized the prompt ($N tokens)" '[ "$N" -gt 20 ]'

# score NAME ARGS...: a completion with --prompt-logprobs 2 over the ids; stderr in $WORK/NAME.err.
score() {
  local name="$1"
  shift
  "${CTL[@]}" "$@" --max-tokens 1 --temperature 0 --prompt-logprobs 2 >"$WORK/$name.out" 2>"$WORK/$name.err"
}
# entries NAME: the scored token ids, one per line.
entries() { sed -n 's/^prompt logprob *[-0-9.]* *\([0-9]*\) .*/\1/p' "$WORK/$1.err"; }
ppl() { sed -n 's/^\[prompt\] .* perplexity \([0-9.]*\)$/\1/p' "$WORK/$1.err"; }
EXPECTED=$(echo "$IDS" | tr ',' '\n' | tail -n +2)

score global complete --token-ids "$IDS" --attention global
check "global: exit 0" '[ $? = 0 ]'
check "global: $((N - 1)) entries, each the next prompt token" '[ "$(entries global)" = "$EXPECTED" ]'
check "global: 2 alternatives per entry" \
  '[ "$(grep "^prompt logprob" "$WORK/global.err" | grep -c "|.*|")" = $((N - 1)) ]'
score exact complete --token-ids "$IDS" --attention exact
check "exact: the same entries" '[ "$(entries exact)" = "$EXPECTED" ]'
score star complete --token-ids "$IDS" --attention star --block-size 4096
check "star, one block: the same entries" '[ "$(entries star)" = "$EXPECTED" ]'
score stream stream --token-ids "$IDS" --attention star --block-size 4096
check "stream: the same entries (sent once, on the last message)" '[ "$(entries stream)" = "$EXPECTED" ]'
# The perplexities agree to the rounding of fp32 in another op order (test_prompt_logprobs: 6e-3 per logprob).
same_ppl() { python3 -c "import sys; a, b = float(sys.argv[1]), float(sys.argv[2]); sys.exit(abs(a - b) > 6e-3 * a)" "$1" "$2"; }
P_GLOBAL=$(ppl global)
check "global perplexity printed ($P_GLOBAL)" '[ -n "$P_GLOBAL" ]'
for m in exact star stream; do
  check "$m perplexity $(ppl $m) equals global's" 'same_ppl "$P_GLOBAL" "$(ppl $m)"'
done
score text complete --prompt "$TEXT"
check "text prompt: the entries of its tokens (as Tokenize gives them)" '[ "$(entries text)" = "$EXPECTED" ]'

for k in -1 21; do
  "${CTL[@]}" complete --token-ids "$IDS" --max-tokens 1 --prompt-logprobs "$k" >/dev/null 2>"$WORK/bad.err"
  rc=$?
  check "prompt_logprobs $k: exit 1, INVALID_ARGUMENT naming the field" \
    '[ $rc = 1 ] && grep -q INVALID_ARGUMENT "$WORK/bad.err" && grep -q prompt_logprobs "$WORK/bad.err"'
done

if python3 -c "import grpc" 2>/dev/null; then
  # Two windows of 16 scored tokens: ids[0:17] and ids[16:33] (TokenFile.sequential's windows).
  python3 -c "import struct, sys; ids = [int(x) for x in sys.argv[1].split(',')]; \
open(sys.argv[2], 'wb').write(struct.pack('<%dH' % len(ids), *ids))" "$IDS" "$WORK/val.bin"
  python3 "$ROOT/evals/perplexity.py" --address "127.0.0.1:$PORT" --val-bin "$WORK/val.bin" --seq 16 --windows 2 \
    --attention global >"$WORK/ppl.json" 2>"$WORK/ppl.err"
  check "perplexity.py: exit 0" '[ $? = 0 ]'
  W1=$(echo "$IDS" | cut -d, -f1-17) W2=$(echo "$IDS" | cut -d, -f17-33)
  score w1 complete --token-ids "$W1" --attention global
  score w2 complete --token-ids "$W2" --attention global
  check "perplexity.py: the windows' perplexity from starctl's entries, 32 tokens, mode global" \
    'python3 -c "
import json, math, re, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
lp = [float(m.group(1)) for f in sys.argv[2:] for m in re.finditer(r\"^prompt logprob *(-?[0-9.]+)\", open(f).read(), re.M)]
want = math.exp(-sum(lp) / len(lp))
sys.exit(not (r[\"tokens\"] == 32 == len(lp) and r[\"windows\"] == 2 and r[\"mode\"] == \"global\"
              and r[\"world_size\"] == 2 and abs(r[\"ppl\"] - want) < 1e-3 * want))
" "$WORK/ppl.json" "$WORK/w1.err" "$WORK/w2.err"'
else
  echo "SKIP: evals/perplexity.py (python3 has no grpcio)"
fi

echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ] || { echo "--- server log"; tail -50 "$WORK/server.log"; exit 1; }
