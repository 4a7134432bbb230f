# Shared by the end-to-end scripts (sourced): results, ports, and waiting on a server that `start` (each script's
# own) launched under mpirun, which sets MPI_PID, PORT and CTL (the starctl command line).
export OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
FAILS=0 PASSES=0

pass() { echo "PASS: $1"; PASSES=$((PASSES + 1)); }
fail() { echo "FAIL: $1"; FAILS=$((FAILS + 1)); }
check() { if eval "$2"; then pass "$1"; else fail "$1"; fi; }
# SIGTERM to pid $1, up to $2 checks $3 s apart for it to end, then SIGKILL; nothing when $1 is empty.
stop_pid() {
  [ -n "$1" ] || return 0
  kill -TERM "$1" 2>/dev/null
  for _ in $(seq 1 "$2"); do kill -0 "$1" 2>/dev/null || break; sleep "$3"; done
  kill -KILL "$1" 2>/dev/null
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Up to 120 s until readiness answers SERVING; fails at once when mpirun has ended.
wait_ready() {
  for _ in $(seq 1 480); do
    "${CTL[@]}" health --ready >/dev/null 2>&1 && return 0
    kill -0 "$MPI_PID" 2>/dev/null || return 1
    sleep 0.25
  done
  return 1
}
# The ranks' pids (children of mpirun serving on PORT), rank 0 first; the pid of rank $1.
rank_pids() { pgrep -P "$MPI_PID" -f -- "--port $PORT" | sort -n; }
rank_pid() { tr '\0' '\n' 2>/dev/null </proc/"$1"/environ | grep -qx "OMPI_COMM_WORLD_RANK=$2"; }
pid_of_rank() { for p in $(rank_pids); do if rank_pid "$p" "$1"; then echo "$p"; return; fi; done; }
# Waits (up to $2 s) for process $1 to end; sets RC (124 when it did not).
wait_exit() {
  RC=124
  for _ in $(seq 1 $(($2 * 4))); do
    if ! kill -0 "$1" 2>/dev/null; then wait "$1"; RC=$?; return; fi
    sleep 0.25
  done
}
