#!/usr/bin/env bash
# End-to-end test of a worker whose step fails (as a failed forward does): real `mpirun -np 2 starserve serve` on the
# default model, real gRPC through `starctl`. STARSERVE_FAIL_STEP=1:4 makes rank 1 fail its 4th step (a DECODE of the
# stream below) through the same path a real error takes. Then:
#   - the stream ends UNAVAILABLE naming rank 1 and its failed step;
#   - readiness turns NOT_SERVING after SERVING;
#   - rank 1 logs the step's error and rank 0's watchdog names rank 1;
#   - mpirun exits non-zero by itself.
# Usage: failed_step_e2e.sh BIN_DIR MODEL. Waits are bounded; no timing is asserted.
set -uo pipefail
BIN="$1" MODEL="$2"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

PORT=$(free_port)
STARSERVE_FAIL_STEP=1:4 mpirun --oversubscribe --allow-run-as-root -np 2 -x STARSERVE_FAIL_STEP "$BIN/starserve" serve \
  --model "$MODEL" --backend cpu --host 127.0.0.1 --port "$PORT" --watchdog-timeout 30 --log-level info \
  >"$WORK/server.log" 2>&1 &
MPI_PID=$!
PIDS+=("$MPI_PID")
CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 120)
wait_ready
check "server ready on 2 ranks" '[ $? = 0 ]'
( while kill -0 "$MPI_PID" 2>/dev/null; do
    "$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 2 health --ready 2>/dev/null | head -1
    sleep 0.1
  done ) >"$WORK/health" &
POLL=$!
PIDS+=("$POLL")
"${CTL[@]}" stream --prompt "Once upon a time, in a small village by the sea, there lived" --max-tokens 200 \
  --ignore-eos --temperature 0 >"$WORK/out" 2>"$WORK/err" &
CLIENT=$!
PIDS+=("$CLIENT")
wait_exit "$MPI_PID" 90
MPI_RC=$RC
wait_exit "$CLIENT" 30
CLIENT_RC=$RC
kill "$POLL" 2>/dev/null
wait "$POLL" 2>/dev/null
check "the stream ends UNAVAILABLE naming rank 1's failed step (starctl exit $CLIENT_RC)" \
  '[ $CLIENT_RC != 0 ] && [ $CLIENT_RC != 124 ] && grep -q "UNAVAILABLE: .*rank 1 .*failed step 4" "$WORK/err"'
check "readiness turns NOT_SERVING after SERVING" \
  'grep -q "^SERVING" "$WORK/health" && sed -n "/^SERVING/,\$p" "$WORK/health" | grep -q NOT_SERVING'
check "rank 1 logs the step's error" 'grep -q "rank 1/2.*step 4 failed on this rank.*STARSERVE_FAIL_STEP" "$WORK/server.log"'
check "rank 0's watchdog names rank 1" 'grep -q "watchdog: .*rank 1 .*failed step 4" "$WORK/server.log"'
check "mpirun exits non-zero by itself (exit $MPI_RC; 124 = still running after 90 s)" '[ $MPI_RC != 0 ] && [ $MPI_RC != 124 ]'

echo "$PASSES passed, $FAILS failed"
[ $FAILS = 0 ] || { echo "== server log"; tail -20 "$WORK/server.log"; echo "== client"; cat "$WORK/err"; }
[ $FAILS = 0 ]
