#!/bin/sh
# The images' entry point (Dockerfile, Dockerfile.cuda, and the launcher/leader of deploy/k8s and deploy/compose):
#   IMAGE generate|serve ARGS...   runs   mpirun -np $STARSERVE_RANKS $STARSERVE_MPIRUN_ARGS starserve generate|serve
#                                         ARGS... [--model $STARSERVE_MODEL]   (--model only when ARGS name none)
#   IMAGE PROGRAM ARGS...          runs that program as it is (exec), e.g. `IMAGE starctl ...`, `IMAGE bash`.
#
# Stopping (docker/podman stop, compose down, a pod's termination): SIGTERM or SIGINT to this script, PID 1, is
# passed to rank 0 alone, the rank that drains (stops admitting, gives running requests --shutdown-grace seconds,
# default 30, ends those left as cancelled with their partial output, then stops the other ranks through the engine,
# so every rank and mpirun exit 0). The other ranks ignore SIGTERM/SIGINT and wait for rank 0. The runtime's grace
# period (`stop --time N`, stop_grace_period, terminationGracePeriodSeconds) should exceed --shutdown-grace by a few
# seconds; SIGKILL ends the drain after it.
# Why not `exec mpirun` and let mpirun have the signal: Open MPI 4.1's mpirun does not forward SIGTERM or SIGINT
# (ess_base_forward_signals refuses them); it aborts the job instead: SIGCONT to every rank, then SIGTERM
# odls_base_sigkill_timeout seconds later (default 1), then SIGKILL after as long again. That is a fixed sleep,
# not a wait for exit, so no setting of it gives a drain, and the workers (which take SIGTERM's default action)
# would see SIGTERM only after that sleep. Measured with 4.1.4: SIGTERM to mpirun, `--mca odls_base_sigkill_timeout
# 25`: the ranks got SIGTERM about 25 s later (rank 0 then drained and every rank exited 0), mpirun exited 1 about 48 s
# after the signal; with the default of 1 s, rank 0 was killed a second into its drain. When rank 0 is not (yet) a child of mpirun here, the signal goes to mpirun (an abort).
# SIGUSR1, SIGUSR2, SIGHUP and SIGQUIT go to mpirun as well (it forwards the USR signals to every rank).
# The functions below run from traps (SC2317).
# shellcheck disable=SC2317
set -eu
case "${1:-}" in
  generate | serve) ;;
  "") echo "usage: IMAGE generate|serve [starserve options]   or   IMAGE PROGRAM [ARGS]" >&2; exit 2 ;;
  *) exec "$@" ;;
esac
has_model=0
for a in "$@"; do
  case "$a" in -m | --model | --model=*) has_model=1 ;; esac
done
if [ "$has_model" = 0 ]; then
  set -- "$@" --model "${STARSERVE_MODEL:-/opt/starserve/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
fi

# The pid of the rank-0 process that mpirun started here (its environment has OMPI_COMM_WORLD_RANK=0).
rank0_pid() {
  for d in /proc/[0-9]*; do
    ppid=""
    while read -r key value; do
      if [ "$key" = PPid: ]; then ppid="$value"; break; fi
    done <"$d/status" 2>/dev/null || continue
    [ "$ppid" = "$mpirun_pid" ] || continue
    if tr '\0' '\n' <"$d/environ" 2>/dev/null | grep -qx 'OMPI_COMM_WORLD_RANK=0'; then
      echo "${d#/proc/}"
      return
    fi
  done
}
to_rank0() {
  pid="$(rank0_pid)"
  if [ -n "$pid" ]; then
    echo "entrypoint: SIG$1 -> rank 0 (pid $pid): draining" >&2
    kill -s "$1" "$pid" 2>/dev/null || true
  else
    echo "entrypoint: SIG$1 -> mpirun (no rank 0 running yet)" >&2
    kill -s "$1" "$mpirun_pid" 2>/dev/null || true
  fi
}

# STARSERVE_MPIRUN_ARGS is a list of mpirun flags (e.g. "--hostfile /tmp/hostfile --map-by slot"): split on spaces
# on purpose. Flags whose values hold spaces go in the environment instead (OMPI_MCA_plm_rsh_args=...).
# shellcheck disable=SC2086
mpirun --allow-run-as-root --oversubscribe -np "${STARSERVE_RANKS:-2}" ${STARSERVE_MPIRUN_ARGS:-} \
  /opt/starserve/bin/starserve "$@" &
mpirun_pid=$!
trap 'to_rank0 TERM' TERM
trap 'to_rank0 INT' INT
for sig in USR1 USR2 HUP QUIT; do
  # shellcheck disable=SC2064  # $sig now, on purpose
  trap "kill -s $sig $mpirun_pid 2>/dev/null || true" "$sig"
done
# `wait` returns early whenever a trapped signal arrives: wait again until mpirun itself has ended, then exit with
# its status.
set +e
while :; do
  wait "$mpirun_pid"
  rc=$?
  kill -0 "$mpirun_pid" 2>/dev/null || break
done
exit "$rc"
