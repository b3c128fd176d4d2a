#!/usr/bin/env bash
# Brings up a real single-node SLURM on this machine (root, Debian/Ubuntu, no systemd):
# installs slurmctld, slurmd, slurm-client and munge when missing, writes a minimal slurm.conf for this
# host (its real CPU count and memory, one partition), starts munged, slurmctld and slurmd directly and
# waits until `sinfo` shows the node idle. The daemons' PIDs go to $LLMFORGE_SLURM_DIR/pids;
# .ci/slurm-down.sh stops them. Used by .ci/run and `make slurm-up`; safe to run again (restarts).
set -euo pipefail

DIR=${LLMFORGE_SLURM_DIR:-/tmp/llmforge-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by llmforge .ci/slurm-up.sh"
HERE=$(cd "$(dirname "$0")" && pwd)

[ "$(id -u)" = 0 ] || { echo "slurm-up: needs root (it starts munged, slurmctld and slurmd)" >&2; exit 1; }

missing=()
for cmd in munged slurmctld slurmd sinfo; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "slurm-up: installing munge and SLURM (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "slurm-up: $CONF exists and was not written by this script; refusing to replace it" >&2
    exit 1
fi

# A previous bring-up still running: stop it first.
[ -f "$DIR/pids" ] && "$HERE/slurm-down.sh"

mkdir -p "$DIR"/{state,spool,log}
: >"$DIR/pids"

# munge: the key comes with the Debian package; create one where it does not.
mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
chmod 0755 /run/munge
chmod 0700 /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

# The node as slurmd sees it (CPUs, sockets, cores, threads); memory a little below what it reports, so
# the node is not drained for "Low RealMemory" when free memory moves.
HOST=$(hostname -s)
read -r -a HW <<<"$(slurmd -C | head -n 1)"
NODE=""
for kv in "${HW[@]}"; do
    case "$kv" in
        NodeName=*) ;;
        RealMemory=*) NODE+=" RealMemory=$(( ${kv#RealMemory=} * 9 / 10 ))" ;;
        *) NODE+=" $kv" ;;
    esac
done
ADDR=$(getent hosts "$HOST" >/dev/null && echo "$HOST" || echo 127.0.0.1)

cat >"$CONF" <<EOF
$MARK
# A single-node test cluster: this host is controller and compute node. No cgroups, no accounting.
ClusterName=llmforge
SlurmctldHost=$HOST($ADDR)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again after cred_expire + 1 s (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=60
NodeName=$HOST NodeAddr=$ADDR$NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=60 State=UP
EOF

start() {  # name, command...: run a daemon in the foreground of a background job, remember its PID
    local name=$1; shift
    "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo "$name $!" >>"$DIR/pids"
}

rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
# setpriv execs munged as the munge user in place: the recorded PID is the daemon's own
start munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { echo "slurm-up: munge does not work" >&2; exit 1; }

start slurmctld slurmctld -D -c -f "$CONF"
start slurmd slurmd -D -f "$CONF"

for i in $(seq 120); do
    state=$(sinfo -h -N -n "$HOST" -o %t 2>/dev/null || true)
    if [ "$state" = idle ]; then
        echo "slurm-up: node $HOST idle after $((i / 2)) s ($(sinfo -h -N -o '%c CPUs, %m MB'));" \
             "logs in $DIR/log, stop with .ci/slurm-down.sh"
        exit 0
    fi
    sleep 0.5
done
echo "slurm-up: node $HOST not idle after 60 s (state: ${state:-no answer}); logs:" >&2
tail -n 20 "$DIR"/log/*.log >&2 || true
exit 1
