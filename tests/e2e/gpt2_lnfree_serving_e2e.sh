#!/usr/bin/env bash
# The LayerNorm-free GPT-2 (arch gpt2_lnfree, docs/specs/lnfree-gpt2.md) served end to end: real `mpirun -np 2
# starserve serve` on tests/golden/lnfree/hf (no LayerNorm, fused FFN with alpha / beta, a softmax temperature per head
# and position; n_positions 64), real starctl over gRPC. Greedy continuations of the golden's prompts in global, exact
# and star attention equal the reference's (scripts/reference/starref/gpt2.py) token for token, and the first token's
# log-probability equals the one of the golden's logits; GetModelInfo names the architecture and the 64 learned
# positions; a prompt that needs more than them is refused with INVALID_ARGUMENT naming the limit while one that fits
# exactly completes.
# Usage: gpt2_lnfree_serving_e2e.sh BIN_DIR GOLDEN_DIR (tests/golden/lnfree). Every wait is bounded; the server is
# stopped on exit.
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

N_POS=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['n_positions'])" "$GOLDEN/hf/config.json")
N_GREEDY=$(python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))['greedy']))" "$GOLDEN/golden.json")

# The folder, then the same weights as GGUF (tests/golden/lnfree/model.gguf: scripts/lnfree_to_gguf.py, float32,
# with the byte-level tokenizer above): the same checks against the same reference.
for FORM in folder gguf; do
if [ "$FORM" = folder ]; then MODEL="$WORK/model"; else MODEL="$GOLDEN/model.gguf"; fi
PORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --backend cpu \
  --host 127.0.0.1 --port "$PORT" --log-level warn >"$WORK/server.$FORM.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 120)
wait_ready
check "$FORM: server ready on 2 ranks" '[ $? = 0 ]'
kill -0 "$MPI_PID" 2>/dev/null || { cat "$WORK/server.$FORM.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }
check "$FORM: GetModelInfo: gpt2_lnfree, context $N_POS" \
  '"${CTL[@]}" info >"$WORK/$FORM.info.json" 2>&1 && grep -q "gpt2_lnfree" "$WORK/$FORM.info.json" && grep -q "\"max_context\": *$N_POS" "$WORK/$FORM.info.json"'

for i in $(seq 0 $((N_GREEDY - 1))); do
  PROMPT=$(golden prompt_ids $i)
  WANT=$(golden generated_ids $i)
  N=$(echo "$WANT" | tr ',' '\n' | grep -c .)
  for mode in global exact star; do
    "${CTL[@]}" complete --token-ids "$PROMPT" --attention $mode --max-tokens "$N" --temperature 0 --logprobs 1 \
      >"$WORK/$FORM.$mode$i.out" 2>"$WORK/$FORM.$mode$i.err"
    check "$FORM: prompt $i, $mode: the $N greedy tokens of the reference" '[ "$(generated "$WORK/$FORM.$mode$i.err")" = "$WANT" ]'
  done
  LP_WANT=$(golden first_logprob $i)
  LP_GOT=$(first_logprob "$WORK/$FORM.global$i.err")
  # starctl prints 4 decimals; fp32 against fp32 agrees far closer than that (test_gpt2_lnfree: ~1e-5).
  check "$FORM: prompt $i: first token's logprob $LP_GOT = the reference's $LP_WANT" \
    'python3 -c "import sys; sys.exit(abs(float(sys.argv[1]) - float(sys.argv[2])) > 1e-4)" "$LP_GOT" "$LP_WANT"'
done

# N_POS positions: N_POS - 1 prompt tokens + 1 generated fit; N_POS + 1 does not.
IDS_FIT=$(seq 0 $((N_POS - 2)) | awk '{print ($1 * 37) % 256}' | paste -sd,)
IDS_LONG=$(seq 0 $((N_POS - 1)) | awk '{print ($1 * 37) % 256}' | paste -sd,)
"${CTL[@]}" complete --token-ids "$IDS_FIT" --max-tokens 1 --temperature 0 >"$WORK/$FORM.fit.out" 2>"$WORK/$FORM.fit.err"
check "$FORM: $((N_POS - 1)) prompt tokens + 1: completes" '[ $? = 0 ] && grep -q "^\[finish length\]" "$WORK/$FORM.fit.err"'
"${CTL[@]}" complete --token-ids "$IDS_LONG" --max-tokens 1 --temperature 0 >"$WORK/$FORM.long.out" 2>"$WORK/$FORM.long.err"
check "$FORM: $N_POS prompt tokens + 1: refused" '[ $? != 0 ]'
check "$FORM: the reason: INVALID_ARGUMENT naming the limit of $N_POS" \
  'grep -q "INVALID_ARGUMENT" "$WORK/$FORM.long.err" && grep -q "$N_POS" "$WORK/$FORM.long.err"'
check "$FORM: health still SERVING" '"${CTL[@]}" health --ready >/dev/null 2>&1'
grep -q "ending the job" "$WORK/server.$FORM.log" && fail "$FORM: a rank ended the job:" && cat "$WORK/server.$FORM.log"
stop_pid "$MPI_PID" 40 0.25
MPI_PID=""
done
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
