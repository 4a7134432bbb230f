#!/usr/bin/env bash
# The Abort RPC end to end: real `mpirun -np 2 starserve serve` on the default model (CPU backend) with the OpenAI
# HTTP API on, real starctl and curl.
#   - a greedy stream with `--request-id` aborted mid-way by `starctl abort` from another connection ends with
#     finish reason cancelled, its id, fewer tokens than asked, and text that agrees with an unaborted run;
#   - a unary request aborted while its 1.5K-token context is encoded returns cancelled and what it had;
#   - a second request with an id in use is refused ALREADY_EXISTS; unknown ids are reported "not found";
#   - with --max-running 1 --max-queue 1, a queued request is aborted from the queue, and one more than the queue
#     holds is refused RESOURCE_EXHAUSTED over gRPC and 429 in OpenAI's error shape over HTTP;
#   - an HTTP stream with an X-Request-Id header is aborted by the same RPC (header echoed, last chunk cancelled);
#   - afterwards both ranks serve and a greedy answer equals the one before.
# Usage: abort_e2e.sh BIN_DIR MODEL. Every wait is bounded; the server is stopped on exit.
set -uo pipefail
BIN="$1" MODEL="$2"
WORK="$(mktemp -d)"
MPI_PID="" BG=""
cleanup() {
  [ -n "$BG" ] && kill "$BG" 2>/dev/null
  stop_pid "$MPI_PID" 40 0.25
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

PORT=$(free_port) HPORT=$(free_port)
mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --backend cpu \
  --host 127.0.0.1 --port "$PORT" --http-port "$HPORT" --max-running 1 --max-queue 1 --log-level info >"$WORK/server.log" 2>&1 &
MPI_PID=$!
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 300)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'
kill -0 "$MPI_PID" 2>/dev/null || { cat "$WORK/server.log"; echo "$PASSES passed, $FAILS failed"; exit 1; }

PROMPT="Write a long story about a lighthouse keeper."
# Up to $2 s until file $1 has at least $3 bytes.
wait_bytes() {
  for _ in $(seq 1 $(($2 * 4))); do
    [ "$(stat -c %s "$1" 2>/dev/null || echo 0)" -ge "$3" ] && return 0
    sleep 0.25
  done
  return 1
}
completion_of() { sed -n 's/^\[finish [a-z]*\] .*completion \([0-9]*\) tokens.*/\1/p' "$1"; }

"${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 24 --temperature 0 --ignore-eos >"$WORK/ref.out" 2>"$WORK/ref.err"
check "reference completion" '[ $? = 0 ] && [ -s "$WORK/ref.out" ]'

# 1. A stream aborted by id from another connection.
"${CTL[@]}" stream --prompt "$PROMPT" --max-tokens 2000 --temperature 0 --ignore-eos --request-id story-1 \
  >"$WORK/s1.out" 2>"$WORK/s1.err" &
BG=$!
wait_bytes "$WORK/s1.out" 60 20
check "the stream produces text" '[ $? = 0 ]'
"${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 4 --request-id story-1 >/dev/null 2>"$WORK/dup.err"
check "a second request with the running id: ALREADY_EXISTS" '[ $? != 0 ] && grep -q "ALREADY_EXISTS.*story-1" "$WORK/dup.err"'
# The running slot is taken: one request waits, the next is refused.
"${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 8 --temperature 0 --request-id queued-1 \
  >"$WORK/q1.out" 2>"$WORK/q1.err" &
QPID=$!
queued=""
for _ in $(seq 1 80); do
  "${CTL[@]}" info 2>/dev/null | grep -q '"queue_depth": 1' && { queued=yes; break; }
  sleep 0.25
done
check "a second request waits in the queue" '[ -n "$queued" ]'
"${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 4 >/dev/null 2>"$WORK/full.err"
check "one more: RESOURCE_EXHAUSTED" '[ $? != 0 ] && grep -q "RESOURCE_EXHAUSTED" "$WORK/full.err"'
code=$(curl -s -o "$WORK/full.json" -w '%{http_code}' --max-time 60 -H 'Content-Type: application/json' \
  --data-binary '{"prompt": "hi", "max_tokens": 1}' "http://127.0.0.1:$HPORT/v1/completions")
check "over HTTP: 429 with an OpenAI error body" '[ "$code" = 429 ] && grep -q "\"error\"" "$WORK/full.json"'
"${CTL[@]}" abort queued-1 >"$WORK/abortq.out" 2>&1
check "the queued request is aborted" '[ $? = 0 ] && grep -qx "aborted queued-1" "$WORK/abortq.out"'
wait_exit "$QPID" 60
check "it returns at once, cancelled, with no tokens" \
  '[ $RC = 0 ] && grep -q "^\[finish cancelled\] .*completion 0 tokens, id queued-1$" "$WORK/q1.err"'
"${CTL[@]}" abort story-1 nobody >"$WORK/abort1.out" 2>&1
rc=$?
check "abort: story-1 aborted, nobody not found (exit 1)" \
  '[ $rc = 1 ] && grep -qx "aborted story-1" "$WORK/abort1.out" && grep -qx "not found nobody" "$WORK/abort1.out"'
wait_exit "$BG" 60
BG=""
check "the stream ends OK" '[ $RC = 0 ]'
check "with finish reason cancelled and its id" 'grep -q "^\[finish cancelled\] .* id story-1$" "$WORK/s1.err"'
n=$(completion_of "$WORK/s1.err")
check "before its max_tokens ($n of 2000 tokens)" '[ -n "$n" ] && [ "$n" -gt 0 ] && [ "$n" -lt 2000 ]'
check "its text agrees with the unaborted greedy run" \
  'python3 - "$WORK/ref.out" "$WORK/s1.out" <<PY
import sys
a, b = (open(p).read().rstrip("\n") for p in sys.argv[1:])
sys.exit(0 if (a.startswith(b) or b.startswith(a)) and b else 1)
PY'
"${CTL[@]}" abort story-1 >"$WORK/abort2.out" 2>&1
check "a finished id is not found" '[ $? = 1 ] && grep -qx "not found story-1" "$WORK/abort2.out"'

# 2. A unary request aborted while its context is encoded.
python3 -c 'import sys; sys.stdout.write("The grass is green. The sky is blue. The sun is yellow. Here we go. " * 90)' \
  >"$WORK/ctx.txt"
"${CTL[@]}" complete --context-file "$WORK/ctx.txt" --query " What colour is the sky?" --max-tokens 2000 \
  --ignore-eos --temperature 0 --request-id long-1 >"$WORK/u1.out" 2>"$WORK/u1.err" &
BG=$!
aborted=""
for _ in $(seq 1 200); do
  if "${CTL[@]}" abort long-1 >/dev/null 2>&1; then aborted=yes; break; fi
  sleep 0.05
done
check "the unary request is found and aborted" '[ -n "$aborted" ]'
wait_exit "$BG" 120
BG=""
check "it returns OK with finish reason cancelled" '[ $RC = 0 ] && grep -q "^\[finish cancelled\] .* id long-1$" "$WORK/u1.err"'
n=$(completion_of "$WORK/u1.err")
check "before its max_tokens ($n of 2000 tokens)" '[ -n "$n" ] && [ "$n" -lt 2000 ]'

# 3. The HTTP API's requests are in the same registry.
curl -s -N -D "$WORK/h1.headers" --max-time 120 -H 'Content-Type: application/json' -H 'X-Request-Id: http-1' \
  --data-binary "{\"prompt\": \"$PROMPT\", \"max_tokens\": 2000, \"temperature\": 0, \"ignore_eos\": true, \"stream\": true}" \
  "http://127.0.0.1:$HPORT/v1/completions" >"$WORK/h1.out" 2>&1 &
BG=$!
wait_bytes "$WORK/h1.out" 60 400
"${CTL[@]}" abort http-1 >"$WORK/abort3.out" 2>&1
check "abort reaches an HTTP stream by its X-Request-Id" '[ $? = 0 ] && grep -qx "aborted http-1" "$WORK/abort3.out"'
wait_exit "$BG" 60
BG=""
check "the HTTP stream ends (curl exit 0) with [DONE]" '[ $RC = 0 ] && grep -q "^data: \[DONE\]" "$WORK/h1.out"'
check "its last choice says cancelled" 'grep -q "\"finish_reason\":\"cancelled\"" "$WORK/h1.out"'
check "the response header echoes the id" 'grep -qi "^x-request-id: http-1" "$WORK/h1.headers"'
code=$(curl -s -o "$WORK/h2.out" -w '%{http_code}' --max-time 60 -H 'Content-Type: application/json' \
  -H 'X-Request-Id: has space' --data-binary '{"prompt": "hi", "max_tokens": 1}' "http://127.0.0.1:$HPORT/v1/completions")
check "a malformed X-Request-Id: 400 naming it" '[ "$code" = 400 ] && grep -q "X-Request-Id" "$WORK/h2.out"'

# 4. Still serving, with the same answer.
"${CTL[@]}" complete --prompt "$PROMPT" --max-tokens 24 --temperature 0 --ignore-eos >"$WORK/after.out" 2>/dev/null
check "a greedy answer after the aborts equals the one before" '[ $? = 0 ] && cmp -s "$WORK/ref.out" "$WORK/after.out"'
check "both ranks still running" 'kill -0 "$MPI_PID" 2>/dev/null && [ "$(rank_pids | wc -l)" = 2 ]'
check "the server logged the aborts" '[ "$(grep -c "Abort: request" "$WORK/server.log")" -ge 3 ]'
[ "$FAILS" = 0 ] || tail -30 "$WORK/server.log"
echo "$PASSES passed, $FAILS failed"
[ "$FAILS" = 0 ]
