#!/usr/bin/env bash
# Start a real two-node SLURM on this one host for the SLURM suite (as root):
# munge, slurmctld and two slurmd (node1, node2) with their own ports, more
# tasks than cores allowed. Installs the Debian packages if missing.
#
#   bash tests/slurm/start_cluster.sh DIR     # writes DIR/slurm.conf, prints SLURM_CONF=...
#   bash tests/slurm/start_cluster.sh DIR stop
set -euo pipefail
dir=$(realpath -m "${1:?usage: start_cluster.sh DIR [stop]}")
if [ "${2:-}" = stop ]; then
  pkill -f "slurmd -f $dir/slurm.conf" || true
  pkill -f "slurmctld -f $dir/slurm.conf" || true
  exit 0
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$dir"/{state,spool/node1,spool/node2,log} /run/munge /var/log/munge /var/lib/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge && chmod 0400 /etc/munge/munge.key
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
cores=$(nproc)
cat > "$dir/slurm.conf" <<CONF
ClusterName=collafuse-ci
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=30
SchedulerType=sched/backfill
# Heterogeneous jobs start only on a backfill pass (every 30 s by default: 2 to 28 s of
# waiting per hetero job in the suite). A requeued job waits out cred_expire (120 s by
# default) before it may start again, when nothing moves its start forward.
SchedulerParameters=bf_interval=2
AuthInfo=cred_expire=30
InactiveLimit=0
MinJobAge=600
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=16818 CPUs=16 RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=16819 CPUs=16 RealMemory=4000 State=UNKNOWN
PartitionName=ci Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" -i
for n in node1 node2; do slurmd -f "$SLURM_CONF" -N "$n"; done
for _ in $(seq 1 30); do
  if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ]; then
    echo "SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 1
done
echo "SLURM did not come up ($cores cores); sinfo says:" >&2
sinfo >&2 || true
tail -n 20 "$dir"/log/*.log >&2 || true
exit 1
