#!/usr/bin/env bash
# End-to-end test of the server's lifecycle: real `mpirun -np 2 starserve serve` on the default model (CPU backend),
# real gRPC through `starctl`. Usage: lifecycle_e2e.sh BIN_DIR MODEL.
#   - health during the load: the port answers health before the model is loaded (log order), readiness turns SERVING;
#   - graceful shutdown: SIGTERM (to every rank) with --shutdown-grace 0 ends a long stream with finish reason
#     cancelled and its partial text, the job exits 0; with a generous grace the stream completes, the job exits 0;
#   - watchdog: a SIGSTOPped worker fails the running stream with UNAVAILABLE naming rank 1, readiness turns
#     NOT_SERVING, mpirun exits non-zero; a SIGKILLed worker ends the job with a log naming it; a SIGSTOPped rank 0
#     is noticed by the worker, which ends the job (exit code 3) naming rank 0.
# Every wait is bounded (generously: no timing is asserted); servers are stopped on exit whatever happens.
# LIFECYCLE_SERVER_ARGS (default empty) is appended to every server's flags, split on whitespace, e.g.
# LIFECYCLE_SERVER_ARGS="--backend cuda" on a GPU machine (both ranks then share the GPU).
set -uo pipefail
BIN="$1" MODEL="$2"
read -r -a EXTRA_SERVER_ARGS <<<"${LIFECYCLE_SERVER_ARGS:-}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do pkill -CONT -P "$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

# start NAME ARGS...: a 2-rank server on a free port; sets PORT, MPI_PID and CTL.
start() {
  local name="$1"
  shift
  PORT=$(free_port)
  mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --host 127.0.0.1 \
    --port "$PORT" "$@" "${EXTRA_SERVER_ARGS[@]}" >"$WORK/$name.log" 2>&1 &
  MPI_PID=$!
  PIDS+=("$MPI_PID")
  CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 300)
}
# Waits (up to 120 s) until the stream's client has printed some text.
wait_for_text() {
  for _ in $(seq 1 480); do
    [ -s "$1" ] && return 0
    sleep 0.25
  done
  return 1
}
LONG_PROMPT="Once upon a time, in a small village by the sea, there lived"

# ---- 1. health during the load, then graceful shutdown with no grace (SIGTERM to every rank) ----
start drain0 --shutdown-grace 0 --log-level info
# Poll liveness and readiness from launch; print what was seen (whether the load is long enough to catch is the
# machine's business; the order of the log lines below is the test).
seen_loading=0
for _ in $(seq 1 480); do
  if "${CTL[@]}" health >/dev/null 2>&1; then
    if ! "${CTL[@]}" health --ready >/dev/null 2>&1; then seen_loading=1; fi
    break
  fi
  sleep 0.05
done
echo "liveness SERVING with readiness NOT_SERVING seen while loading: $([ $seen_loading = 1 ] && echo yes || echo no)"
wait_ready
check "readiness turns SERVING once every rank has loaded" '[ $? = 0 ]'
line_of() { grep -n -m1 "$1" "$WORK/drain0.log" | cut -d: -f1; }
l_listen=$(line_of "gRPC listening on") l_loaded=$(line_of "loaded in [0-9.]* s on") l_ready=$(line_of "is SERVING")
check "the port answers health before the model is loaded (log lines $l_listen < $l_loaded < $l_ready)" \
  '[ -n "$l_listen" ] && [ -n "$l_loaded" ] && [ -n "$l_ready" ] && [ "$l_listen" -lt "$l_loaded" ] && [ "$l_loaded" -lt "$l_ready" ]'
check "the listening line says the model is loading" 'grep -q "gRPC listening on .*; model loading" "$WORK/drain0.log"'
check "liveness SERVING" '"${CTL[@]}" health >/dev/null 2>&1'

"${CTL[@]}" stream --prompt "$LONG_PROMPT" --max-tokens 3000 --ignore-eos --temperature 0 \
  >"$WORK/drain0.out" 2>"$WORK/drain0.err" &
CLIENT=$!
wait_for_text "$WORK/drain0.out"
for p in $(rank_pids); do kill -TERM "$p"; done  # as mpirun or a container runtime would: every rank
wait "$CLIENT"
client_rc=$?
wait_exit "$MPI_PID" 120
check "grace 0: the stream ends as a normal answer (starctl exit $client_rc)" '[ $client_rc = 0 ]'
check "grace 0: its last response has finish reason cancelled" 'grep -q "^\[finish cancelled\]" "$WORK/drain0.err"'
check "grace 0: with the partial text ($(wc -c <"$WORK/drain0.out") bytes)" '[ -s "$WORK/drain0.out" ]'
check "grace 0: the job exits 0 (mpirun exit $RC)" '[ $RC = 0 ]'
check "grace 0: the log says it drained and stopped" 'grep -q "signal received: draining" "$WORK/drain0.log" && grep -q "\] stopped" "$WORK/drain0.log"'

# ---- 2. graceful shutdown with a generous grace: the running stream completes; new RPCs are refused ----
start drain60 --shutdown-grace 600 --log-level info
wait_ready
check "second server ready" '[ $? = 0 ]'
"${CTL[@]}" stream --prompt "$LONG_PROMPT" --max-tokens 200 --ignore-eos --temperature 0 \
  >"$WORK/drain60.out" 2>"$WORK/drain60.err" &
CLIENT=$!
wait_for_text "$WORK/drain60.out"
kill -TERM "$(pid_of_rank 0)"
# While the stream drains: readiness NOT_SERVING and new RPCs UNAVAILABLE. Checked only while it still runs.
for _ in $(seq 1 40); do "${CTL[@]}" health --ready >/dev/null 2>&1 || break; sleep 0.05; done
"${CTL[@]}" health --ready >"$WORK/drain60.ready" 2>&1
"${CTL[@]}" complete --prompt hi --max-tokens 2 >/dev/null 2>"$WORK/drain60.new"
if kill -0 "$CLIENT" 2>/dev/null; then
  check "draining: readiness NOT_SERVING" 'grep -q NOT_SERVING "$WORK/drain60.ready"'
  check "draining: a new RPC gets UNAVAILABLE shutting down" 'grep -q "UNAVAILABLE: the server is shutting down" "$WORK/drain60.new"'
else
  echo "the stream ended before the checks during the drain: not checked"
fi
wait "$CLIENT"
client_rc=$?
wait_exit "$MPI_PID" 600
check "generous grace: the stream completes (finish length, 200 tokens)" \
  '[ $client_rc = 0 ] && grep -q "^\[finish length\] .* completion 200 tokens" "$WORK/drain60.err"'
check "generous grace: the job exits 0 (mpirun exit $RC)" '[ $RC = 0 ]'

# ---- 3. watchdog: a stopped worker ----
start stopped --watchdog-timeout 3 --log-level info
wait_ready
check "third server ready" '[ $? = 0 ]'
( while kill -0 "$MPI_PID" 2>/dev/null; do
    "${CTL[@]}" health --ready 2>/dev/null | head -1
    sleep 0.1
  done ) >"$WORK/stopped.health" &
HEALTH_POLL=$!
"${CTL[@]}" stream --prompt "$LONG_PROMPT" --max-tokens 3000 --ignore-eos --temperature 0 \
  >"$WORK/stopped.out" 2>"$WORK/stopped.err" &
CLIENT=$!
wait_for_text "$WORK/stopped.out"
WORKER=$(pid_of_rank 1)
kill -STOP "$WORKER"
wait "$CLIENT"
client_rc=$?
wait_exit "$MPI_PID" 120
kill -CONT "$WORKER" 2>/dev/null
wait "$HEALTH_POLL" 2>/dev/null
check "stopped worker: the stream ends UNAVAILABLE naming rank 1 (starctl exit $client_rc)" \
  '[ $client_rc != 0 ] && grep -q "UNAVAILABLE: rank 1 (host .*) has sent no heartbeat" "$WORK/stopped.err"'
check "stopped worker: readiness turns NOT_SERVING after SERVING" \
  'grep -q "^SERVING" "$WORK/stopped.health" && sed -n "/^SERVING/,\$p" "$WORK/stopped.health" | grep -q NOT_SERVING'
check "stopped worker: the log names the rank and the job's end" \
  'grep -q "watchdog: rank 1 (host .*) has sent no heartbeat" "$WORK/stopped.log" && grep -q "ending the job (exit code 3)" "$WORK/stopped.log"'
check "stopped worker: mpirun exits non-zero (exit $RC)" '[ $RC != 0 ] && [ $RC != 124 ]'

# ---- 4. a killed worker ----
start killed --watchdog-timeout 3 --log-level info
wait_ready
check "fourth server ready" '[ $? = 0 ]'
kill -KILL "$(pid_of_rank 1)"
wait_exit "$MPI_PID" 120
check "killed worker: mpirun exits non-zero (exit $RC)" '[ $RC != 0 ] && [ $RC != 124 ]'
check "killed worker: the log names rank 1 and the signal" 'grep -Eq "rank 1 .*(signal 9|Killed)" "$WORK/killed.log"'

# ---- 5. a stopped rank 0: the worker ends the job ----
start stopped0 --watchdog-timeout 3 --log-level info
wait_ready
check "fifth server ready" '[ $? = 0 ]'
RANK0=$(pid_of_rank 0)
kill -STOP "$RANK0"
wait_exit "$MPI_PID" 120
kill -CONT "$RANK0" 2>/dev/null
check "stopped rank 0: mpirun exits with the watchdog's code 3 (exit $RC)" '[ $RC = 3 ]'
check "stopped rank 0: rank 1's log names rank 0 and the job's end" \
  'grep -q "\[rank 1/2\] watchdog: rank 0 has answered no heartbeat" "$WORK/stopped0.log" &&
   grep -q "\[rank 1/2\] ending the job (exit code 3)" "$WORK/stopped0.log"'

echo "$PASSES passed, $FAILS failed"
[ $FAILS = 0 ] || { for f in "$WORK"/*.log; do echo "== $f"; tail -20 "$f"; done; }
[ $FAILS = 0 ]
