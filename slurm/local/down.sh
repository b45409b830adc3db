#!/usr/bin/env bash
# Stops the single-node SLURM cluster of slurm/local/up.sh: slurmd, slurmctld and the munged it
# started, each by its pid file (never by process name: other users' daemons are left alone).
# Jobs still running are cancelled first so their tasks do not outlive the cluster.
#   slurm/local/down.sh            # LM_SLURM_PREFIX as for up.sh (default /tmp/lm-slurm)
#   slurm/local/down.sh --purge    # also removes the prefix (state, logs, slurm.conf)
set -uo pipefail

PREFIX=${LM_SLURM_PREFIX:-/tmp/lm-slurm}
export SLURM_CONF=$PREFIX/slurm.conf

stop() {  # stop NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
  local name=$1 pidfile=$2 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "slurm/local/down.sh: $name ($pid) ignored SIGTERM; killing it" >&2
      kill -KILL "$pid"
    fi
  fi
  rm -f "$pidfile"
}

if [ -f "$SLURM_CONF" ] && [ -f "$PREFIX/slurmctld.pid" ] && command -v scancel >/dev/null; then
  scancel --full --quiet --partition=debug 2>/dev/null || true
  for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop slurmd "$PREFIX/slurmd.pid"
stop slurmctld "$PREFIX/slurmctld.pid"
stop munged "$PREFIX/munged.pid"  # only present when up.sh started munged itself

if [ "${1:-}" = --purge ]; then
  rm -rf "$PREFIX"
fi
