#!/usr/bin/env bash
# Brings up a single-node SLURM cluster on this machine (Debian's slurmctld, slurmd and munge, run as
# root without systemd), for tests/slurm and for trying `lm launch` without a real cluster.
#
#   slurm/local/up.sh            # installs the packages if missing, starts munged, slurmctld, slurmd
#   export SLURM_CONF=/tmp/lm-slurm/slurm.conf   # what it prints last; sbatch/squeue/scontrol read it
#   slurm/local/down.sh          # stops the daemons by their pid files
#
# LM_SLURM_PREFIX (default /tmp/lm-slurm) holds slurm.conf, state, spool, logs and pid files.
# Idempotent: daemons already running from this prefix are kept. The configuration is the one in
# ../shared/notes/platform.md ("A real single-node SLURM cluster"): one node, partition `debug`,
# no accounting (use `scontrol show job`, not sacct), KillWait=5 (a terminated job's tasks get
# SIGTERM, then SIGKILL 5 s later), EnforcePartLimits=ALL so an over-sized request is rejected at
# submission instead of pending forever.
set -euo pipefail

PREFIX=${LM_SLURM_PREFIX:-/tmp/lm-slurm}
CONF=$PREFIX/slurm.conf

die() { echo "slurm/local/up.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (the daemons run as root here)"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# -- packages ---------------------------------------------------------------------------------------
PKGS="slurmctld slurmd slurm-client munge"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || die "slurm is not installed and apt-get is unavailable"
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  apt-get install -y --no-install-recommends $PKGS >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends $PKGS >/dev/null; } \
    || die "apt-get install $PKGS failed"
fi

mkdir -p "$PREFIX/state" "$PREFIX/spool"

# -- munge --------------------------------------------------------------------------------------------
# The package may already have made a key; munged refuses keys not owned by munge or readable by others.
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge
chown munge:munge /run/munge
if alive "$PREFIX/munged.pid"; then
  :
elif [ -S /run/munge/munge.socket.2 ] && munge -n </dev/null >/dev/null 2>&1; then
  : # a munged that this script did not start is serving; leave it to its owner (no pid file of ours)
else
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$PREFIX/munged.pid"
fi

# -- slurm.conf ---------------------------------------------------------------------------------------
HOST=$(hostname -s)
NODE=$(slurmd -C | head -n 1)  # NodeName=<host> CPUs=... RealMemory=...
cat >"$CONF" <<EOF
# Written by slurm/local/up.sh: a one-node cluster for tests (see ../shared/notes/platform.md).
ClusterName=lm-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$PREFIX/state
SlurmdSpoolDir=$PREFIX/spool
SlurmctldPidFile=$PREFIX/slurmctld.pid
SlurmdPidFile=$PREFIX/slurmd.pid
SlurmctldLogFile=$PREFIX/slurmctld.log
SlurmdLogFile=$PREFIX/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
EnforcePartLimits=ALL
ReturnToService=2
KillWait=5
MinJobAge=300
$NODE NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$CONF

# -- daemons (both daemonize and write their pid files) ---------------------------------------------
alive "$PREFIX/slurmctld.pid" || slurmctld -f "$CONF"
alive "$PREFIX/slurmd.pid" || slurmd -f "$CONF"

for _ in $(seq 100); do
  state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1 || true)
  case "$state" in idle|mixed|allocated) break ;; esac
  sleep 0.2
done
case "${state:-}" in
  idle|mixed|allocated) ;;
  *) die "node did not become idle (state '${state:-none}'); see $PREFIX/slurmctld.log and $PREFIX/slurmd.log" ;;
esac
echo "export SLURM_CONF=$CONF"
