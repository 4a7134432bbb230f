#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian 12's packages, to try deploy/slurm/starserve.sbatch
# without a cluster: munge + slurmctld + slurmd on localhost, one partition `test` with every CPU of this machine,
# no cgroups (proctrack/linuxproc, task/none), no accounting. As root; idempotent; not for production.
#
#   deploy/slurm/one-node-slurm.sh            # install, configure, start; then `sinfo` shows the node idle
#   deploy/slurm/one-node-slurm.sh stop       # stop the daemons
set -euo pipefail
if [ "${1:-}" = stop ]; then
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if [ -f "$f" ]; then kill "$(cat "$f")" 2>/dev/null || true; fi
  done
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
node="$(hostname -s)"
cpus="$(nproc)"
mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge
cat >/etc/slurm/slurm.conf <<CONF
ClusterName=starserve-test
SlurmctldHost=$node
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName=$node CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF
chown munge:munge /run/munge
[ -f /etc/munge/munge.key ] || { mungekey --create; chown munge:munge /etc/munge/munge.key; }
pgrep -u munge -x munged >/dev/null || runuser -u munge -- munged
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 30); do
  sinfo -h -o %T 2>/dev/null | grep -q idle && break
  sleep 1
done
sinfo
srun --mpi=list 2>&1 | tr '\n' ' '
echo
