#!/usr/bin/env bash
# A real SLURM on this one machine for the SLURM tests: a controller and two emulated nodes (n1, n2).
#   tools/local_slurm.sh install   Debian packages (slurmctld, slurmd, slurm-client, munge), if missing
#   tools/local_slurm.sh start     writes the config under $OPSD_SLURM_DIR, starts munge, slurmctld, 2 slurmd
#   tools/local_slurm.sh stop      scontrol shutdown (controller and nodes), then munge
# Needs root (the daemons run as root: SlurmUser=root). The tests find it through SLURM_CONF.
set -euo pipefail
DIR=${OPSD_SLURM_DIR:-/tmp/opsd-slurm}
CPUS=${OPSD_SLURM_CPUS:-8}    # declared per node (more than exist: SlurmdParameters=config_overrides)

install() {
    [ "$(id -u)" = 0 ] || { echo "tools/local_slurm.sh: the SLURM daemons run as root; run it as root" >&2; return 1; }
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && return
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"   # no jobs, node states or log lines from an earlier start
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool"
    cat >"$DIR/slurm.conf" <<CONF
ClusterName=opsd
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=1,bf_hetjob_immediate,sched_interval=1
SlurmdParameters=config_overrides
MinJobAge=4
KillWait=10
AuthInfo=cred_expire=10
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
NodeName=n1 NodeAddr=127.0.0.1 Port=6821 CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=6822 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
}

start() {
    install
    stop
    write_config
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    chmod 400 /etc/munge/munge.key
    start_munge
    export SLURM_CONF=$DIR/slurm.conf
    slurmctld -i
    slurmd -N n1
    slurmd -N n2
    for _ in $(seq 60); do
        [ "$(timeout 5 sinfo -h -o %t 2>/dev/null | sort -u)" = "idle" ] && { echo "SLURM up: SLURM_CONF=$SLURM_CONF"; return; }
        sleep 0.5
    done
    echo "local SLURM did not come up; logs in $DIR/log:" >&2
    tail -n 20 "$DIR"/log/* >&2
    return 1
}

munge_works() { timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }

start_munge() {  # a munged that answers: a socket left by a killed one (machine restarts keep /run) is not one
    munge_works && return
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock /run/munge/munged.pid
    su -s /bin/sh munge -c /usr/sbin/munged
    for _ in $(seq 40); do munge_works && return; sleep 0.25; done
    echo "munged does not answer; its log, /var/log/munge/munged.log:" >&2
    tail -n 20 /var/log/munge/munged.log >&2
    return 1
}

daemons() {  # the PIDs of this SLURM's controller and nodes: SLURM processes started with its SLURM_CONF
    local pid
    for pid in $(pgrep -x slurmctld; pgrep -x slurmd; pgrep -x slurmstepd); do
        { tr '\0' '\n' <"/proc/$pid/environ"; } 2>/dev/null | grep -qxF "SLURM_CONF=$DIR/slurm.conf" && echo "$pid"
    done
    return 0
}

stop() {
    export SLURM_CONF=$DIR/slurm.conf
    [ -f "$SLURM_CONF" ] && scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 20); do [ -z "$(daemons)" ] && break; sleep 0.5; done
    local left
    left=$(daemons)
    [ -z "$left" ] || kill $left 2>/dev/null || true
    local munged
    munged=$(cat /run/munge/munged.pid 2>/dev/null) || return 0
    [ "$(cat "/proc/$munged/comm" 2>/dev/null)" = munged ] || return 0   # a PID file a killed munged left
    kill "$munged" 2>/dev/null || return 0
    for _ in $(seq 20); do kill -0 "$munged" 2>/dev/null || break; sleep 0.25; done
}

"${1:?usage: $0 install|start|stop}"
