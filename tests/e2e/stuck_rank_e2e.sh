#!/usr/bin/env bash
# End-to-end test of the watchdog for a rank whose main thread is stuck while its heartbeat thread still beats:
# real `mpirun -np 2 starserve serve --watchdog-timeout 3` on the default model, real gRPC through `starctl`.
# Usage: stuck_rank_e2e.sh BIN_DIR MODEL [CASE...] (idle, step). LIFECYCLE_SERVER_ARGS is appended to the server's flags (as in
# lifecycle_e2e.sh).
# Rank 1's main thread is stopped alone through ptrace (freeze_thread.py; SIGSTOP would stop the heartbeat thread
# too, which lifecycle_e2e.sh covers), and the test first checks that this is the state it made: the main thread in
# tracing stop, another thread of the rank not stopped. Two moments:
#   - idle: the thread stops while the ranks wait for work, then a stream is sent;
#   - in a step: the thread stops while a stream decodes (rank 0 then waits for it inside the same step).
# Each time the stream must end UNAVAILABLE naming rank 1, readiness turn NOT_SERVING and mpirun exit non-zero.
# Waits are bounded (60 s for a 3 s timeout); no timing is asserted.
set -uo pipefail
BIN="$1" MODEL="$2"
shift 2
CASES=("$@")
[ ${#CASES[@]} = 0 ] && CASES=(idle step)
HERE="$(cd "$(dirname "$0")" && pwd)"
WORK="$(mktemp -d)"
read -r -a EXTRA_SERVER_ARGS <<<"${LIFECYCLE_SERVER_ARGS:-}"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT

source "$(dirname "$0")/e2e_lib.sh"

start() {
  local name="$1"
  PORT=$(free_port)
  mpirun --oversubscribe --allow-run-as-root -np 2 "$BIN/starserve" serve --model "$MODEL" --host 127.0.0.1 \
    --port "$PORT" --watchdog-timeout 3 --log-level info "${EXTRA_SERVER_ARGS[@]}" >"$WORK/$name.log" 2>&1 &
  MPI_PID=$!
  PIDS+=("$MPI_PID")
  CTL=("$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 120)
}
wait_for() {  # wait_for FILE PATTERN: up to 120 s until FILE has a line matching PATTERN (empty: any text)
  for _ in $(seq 1 480); do
    if [ -z "$2" ]; then [ -s "$1" ] && return 0; else grep -q "$2" "$1" 2>/dev/null && return 0; fi
    sleep 0.25
  done
  return 1
}
thread_state() { awk '/^State:/ {print $2}' "/proc/$1/task/$2/status" 2>/dev/null; }
# Without ptrace rights (a container without CAP_SYS_PTRACE, Yama scope 3) the state cannot be made: skip (77).
sleep 60 &
PROBE=$!
timeout 10 python3 "$HERE/freeze_thread.py" "$PROBE" >"$WORK/probe.freeze" 2>&1 &
PROBER=$!
for _ in $(seq 1 40); do grep -q "^stopped" "$WORK/probe.freeze" 2>/dev/null && break; kill -0 "$PROBER" 2>/dev/null || break; sleep 0.25; done
if ! grep -q "^stopped" "$WORK/probe.freeze"; then
  echo "SKIP: ptrace is not permitted here ($(cat "$WORK/probe.freeze"))"
  kill "$PROBER" "$PROBE" 2>/dev/null
  exit 77
fi
kill "$PROBER" 2>/dev/null; wait "$PROBER" 2>/dev/null; kill "$PROBE" 2>/dev/null

# freeze NAME: stops rank 1's main thread (its tid is the process id); sets WORKER and FREEZER.
freeze() {
  WORKER=$(pid_of_rank 1)
  python3 "$HERE/freeze_thread.py" "$WORKER" >"$WORK/$1.freeze" 2>&1 &
  FREEZER=$!
  PIDS+=("$FREEZER")
  wait_for "$WORK/$1.freeze" "^stopped"
  local others=0 tid task
  for task in /proc/"$WORKER"/task/*; do
    tid=${task##*/}
    [ "$tid" != "$WORKER" ] && [ "$(thread_state "$WORKER" "$tid")" != t ] && [ "$(thread_state "$WORKER" "$tid")" != T ] &&
      others=$((others + 1))
  done
  check "$1: rank 1's main thread is in tracing stop ($(cat "$WORK/$1.freeze"))" \
    '[ "$(thread_state "$WORKER" "$WORKER")" = t ]'
  check "$1: $others other thread(s) of rank 1 still run (the heartbeat's among them)" '[ $others -ge 1 ]'
}
LONG_PROMPT="Once upon a time, in a small village by the sea, there lived"

# run NAME WHEN: WHEN=idle freezes before the stream is sent, step while it decodes.
run() {
  local name="$1" when="$2"
  start "$name"
  wait_ready
  check "$name: server ready" '[ $? = 0 ]'
  ( while kill -0 "$MPI_PID" 2>/dev/null; do
      "$BIN/starctl" --address "127.0.0.1:$PORT" --timeout 2 health --ready 2>/dev/null | head -1
      sleep 0.1
    done ) >"$WORK/$name.health" &
  local poll=$!
  [ "$when" = idle ] && freeze "$name"
  "${CTL[@]}" stream --prompt "$LONG_PROMPT" --max-tokens 3000 --ignore-eos --temperature 0 \
    >"$WORK/$name.out" 2>"$WORK/$name.err" &
  local client=$!
  PIDS+=("$client")
  if [ "$when" = step ]; then
    wait_for "$WORK/$name.out" ""
    freeze "$name"
  fi
  wait_exit "$MPI_PID" 60
  local mpi_rc=$RC
  wait_exit "$client" 30
  local client_rc=$RC
  kill -TERM "$FREEZER" 2>/dev/null
  kill -KILL "$MPI_PID" "$client" 2>/dev/null
  wait "$poll" 2>/dev/null
  check "$name: the stream ends UNAVAILABLE naming rank 1 (starctl exit $client_rc)" \
    '[ $client_rc != 0 ] && [ $client_rc != 124 ] && grep -q "UNAVAILABLE: .*rank 1 (host " "$WORK/$name.err"'
  check "$name: readiness turns NOT_SERVING after SERVING" \
    'grep -q "^SERVING" "$WORK/$name.health" && sed -n "/^SERVING/,\$p" "$WORK/$name.health" | grep -q NOT_SERVING'
  check "$name: the log names rank 1" 'grep -q "watchdog: .*rank 1 (host " "$WORK/$name.log"'
  check "$name: mpirun exits non-zero by itself (exit $mpi_rc; 124 = still running after 60 s)" \
    '[ $mpi_rc != 0 ] && [ $mpi_rc != 124 ]'
}

# The cases to run (default both). "idle": rank 0 names the rank that has not received the step; "step": every rank
# has the step, and rank 0 names the one whose main thread has stopped running (the heartbeat carries its CPU time)
# while the others wait for it inside a collective.
for c in "${CASES[@]}"; do run "$c" "$c"; done

echo "$PASSES passed, $FAILS failed"
[ $FAILS = 0 ] || { for f in "$WORK"/*.log "$WORK"/*.err; do echo "== $f"; tail -8 "$f"; done; }
[ $FAILS = 0 ]
