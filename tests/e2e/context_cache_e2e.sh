#!/usr/bin/env bash
# Context reuse end to end: real `mpirun -np 2 starserve serve` on the default model (CPU backend, star mode with two
# blocks) with the OpenAI HTTP API on, real starctl and curl.
#   - a first question about a document encodes it (0 context tokens from the cache) and returns a context id;
#   - a second question about the same document gets all of its context from the cache (no phase 1);
#   - the first question asked again by context id (no document sent), over gRPC and over HTTP, answers exactly as
#     when the document was encoded for it;
#   - GetServerInfo and the metrics count the hits and misses; an unknown context id is NOT_FOUND / HTTP 404;
#   - n > 1 choices (the sequence forked after the query, sharing its KV): greedy, each choice is the greedy answer,
#     unary and streamed over gRPC and over HTTP; usage counts every choice's tokens.
# Usage: context_cache_e2e.sh BIN_DIR MODEL. Every wait is bounded; the server is stopped on exit.
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

PORT=$(free_port) HPORT=$(free_port) MPORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --backend cpu \
  --host 127.0.0.1 --port "$PORT" --http-port "$HPORT" --metrics-port "$MPORT" --attention star --n-blocks 2 \
  --log-level info >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 300)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'
kill -0 "$MPI_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }

for i in $(seq 1 12); do
  echo "Entry $i. The lighthouse on the north cape was painted red in 1911, and its keeper, Ada Lind, kept a log."
done >"$WORK/doc.txt"
Q1=" Who kept the lighthouse log?"
Q2=" What color was the lighthouse painted?"
GEN=(--max-tokens 12 --temperature 0 --ignore-eos)
context_line() { grep '^\[context\]' "$1"; }
context_id_of() { sed -n 's/^\[context\] id \(ctx-[0-9a-f]*\),.*/\1/p' "$1"; }

"${CTL[@]}" complete --context-file "$WORK/doc.txt" --query "$Q1" "${GEN[@]}" >"$WORK/a.out" 2>"$WORK/a.err"
check "first question: answered, the context encoded (0 tokens from the cache)" \
  '[ $? = 0 ] && [ -s "$WORK/a.out" ] && context_line "$WORK/a.err" | grep -q ", 0 of [0-9]* context tokens from the cache"'
ID=$(context_id_of "$WORK/a.err")
check "it returns a context id" '[ -n "$ID" ]'
N=$(sed -n 's/^\[finish [a-z]*\] prompt [0-9]* tokens (context \([0-9]*\),.*/\1/p' "$WORK/a.err")

"${CTL[@]}" complete --context-file "$WORK/doc.txt" --query "$Q2" "${GEN[@]}" >"$WORK/b.out" 2>"$WORK/b.err"
check "second question about the same document: all $N context tokens from the cache, the same id" \
  '[ $? = 0 ] && context_line "$WORK/b.err" | grep -q "id $ID, $N of $N context tokens from the cache"'
check "... and no phase 1" 'grep -q "phase 1 0.0 ms" "$WORK/b.err"'

"${CTL[@]}" complete --context-id "$ID" --query "$Q1" "${GEN[@]}" >"$WORK/c.out" 2>"$WORK/c.err"
check "the first question again by context id: the same answer as when the document was encoded" \
  '[ $? = 0 ] && cmp -s "$WORK/a.out" "$WORK/c.out" && context_line "$WORK/c.err" | grep -q "$N of $N"'

curl -s -o "$WORK/h.json" -w '%{http_code}' "http://127.0.0.1:$HPORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"$Q1\", \"context_id\": \"$ID\", \"max_tokens\": 12, \"temperature\": 0, \"ignore_eos\": true}" \
  >"$WORK/h.code"
check "HTTP with context_id: 200, cached_tokens $N, context_id echoed, the same text" \
  '[ "$(cat "$WORK/h.code")" = 200 ] && python3 - "$WORK/h.json" "$WORK/a.out" "$ID" "$N" <<PY
import json, sys
r = json.load(open(sys.argv[1]))
want = open(sys.argv[2]).read()
ok = (r["usage"]["prompt_tokens_details"]["cached_tokens"] == int(sys.argv[4]) and r["context_id"] == sys.argv[3]
      and r["choices"][0]["text"] == want.rstrip("\n"))
sys.exit(0 if ok else 1)
PY'

"${CTL[@]}" complete --context-id ctx-0123456789abcdef --query "$Q1" --max-tokens 2 >/dev/null 2>"$WORK/nf.err"
check "an unknown context id: NOT_FOUND naming it" '[ $? != 0 ] && grep -q "NOT_FOUND.*ctx-0123456789abcdef" "$WORK/nf.err"'
code=$(curl -s -o "$WORK/nf.json" -w '%{http_code}' "http://127.0.0.1:$HPORT/v1/completions" \
  -H 'Content-Type: application/json' -d '{"prompt": "Hi", "context_id": "ctx-0123456789abcdef", "max_tokens": 2}')
check "... over HTTP: 404 context_not_found" '[ "$code" = 404 ] && grep -q "context_not_found" "$WORK/nf.json"'

"${CTL[@]}" info >"$WORK/info.json" 2>&1
check "GetServerInfo: 3 hits, 1 miss, 1 cached context" 'python3 - "$WORK/info.json" <<PY
import json, sys
c = json.load(open(sys.argv[1]))["server"]["context_cache"]
sys.exit(0 if c["enabled"] and int(c["hits"]) == 3 and int(c["misses"]) == 1 and int(c["entries"]) == 1 else 1)
PY'
curl -s "http://127.0.0.1:$MPORT/metrics" >"$WORK/metrics.txt"
check "metrics: hits and misses counters, cached pages gauge" \
  'grep -q "^starserve_context_cache_hits_total 3" "$WORK/metrics.txt" && grep -q "^starserve_context_cache_misses_total 1" "$WORK/metrics.txt" && grep -q "^starserve_context_cache_pages [1-9]" "$WORK/metrics.txt"'

# n > 1: three greedy choices of the first question, each its greedy answer (a.out), from the cached context.
choice_texts() { python3 - "$1" <<'PY'
import re, sys
parts = re.split(r"^--- choice (\d+) \((\w+)\)\n", open(sys.argv[1]).read(), flags=re.M)
for i in range(1, len(parts), 3):
    print(parts[i], parts[i + 1], repr(parts[i + 2].rstrip("\n")))
PY
}
want=$(python3 -c 'import sys; print(repr(open(sys.argv[1]).read().rstrip("\n")))' "$WORK/a.out")
for rpc in complete stream; do
  "${CTL[@]}" "$rpc" --context-id "$ID" --query "$Q1" "${GEN[@]}" --n 3 >"$WORK/n3_$rpc.out" 2>"$WORK/n3_$rpc.err"
  check "$rpc --n 3: three choices, each the greedy answer, 36 completion tokens" \
    '[ $? = 0 ] && [ "$(choice_texts "$WORK/n3_$rpc.out")" = "0 length $want
1 length $want
2 length $want" ] && grep -q "completion 36 tokens" "$WORK/n3_$rpc.err"'
done
curl -s -o "$WORK/n2.json" "http://127.0.0.1:$HPORT/v1/completions" -H 'Content-Type: application/json' \
  -d "{\"prompt\": \"$Q1\", \"context_id\": \"$ID\", \"max_tokens\": 12, \"temperature\": 0, \"ignore_eos\": true, \"n\": 2}"
check "HTTP n = 2: two choices with indices 0 and 1, each the greedy answer, 24 completion tokens" \
  'python3 - "$WORK/n2.json" "$WORK/a.out" <<PY
import json, sys
r = json.load(open(sys.argv[1]))
want = open(sys.argv[2]).read().rstrip("\n")
ok = [c["index"] for c in r["choices"]] == [0, 1] and all(c["text"] == want for c in r["choices"])
sys.exit(0 if ok and r["usage"]["completion_tokens"] == 24 else 1)
PY'

kill -0 "$MPI_PID" 2>/dev/null
check "the server still runs" '[ $? = 0 ]'
[ "$FAILS" = 0 ] || { echo "--- server log"; tail -40 "$WORK/server.log"; }
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
