#!/usr/bin/env bash
# A real single-node SLURM on 127.0.0.1 for tests: Debian's munge + slurmctld + slurmd, no cgroups,
# no accounting. Usage: tools/slurm_local.sh start|stop|status [WORKDIR]
# Needs root on Debian. `start` installs the packages if missing, writes the config under WORKDIR,
# starts the daemons with pid files and waits until the node is idle; `stop` ends exactly those pids.
set -euo pipefail

ACTION="${1:-status}"
WORK="${2:-${DUPLUS_SLURM_DIR:-/tmp/duplus-slurm}}"
CONF="$WORK/etc/slurm.conf"
# munged runs as the munge user, which cannot enter a root-only WORKDIR (pytest's tmp is 0700), so
# its key, socket and log live in a folder of their own, named after WORKDIR.
MUNGE="${DUPLUS_MUNGE_DIR:-/tmp/duplus-munge-$(printf '%s' "$WORK" | sha256sum | cut -c1-12)}"

need_root_debian() {
    if [[ $(id -u) -ne 0 ]]; then echo "slurm_local: needs root" >&2; exit 3; fi
    if [[ ! -f /etc/debian_version ]]; then echo "slurm_local: needs a Debian machine" >&2; exit 3; fi
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
}

write_config() {
    mkdir -p "$WORK"/{etc,log,state,spool,run,bin} "$MUNGE"
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
    cat >"$CONF" <<CONF
ClusterName=duplus-local
SlurmctldHost=localhost(127.0.0.1)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
AuthInfo=socket=$MUNGE/munge.socket.2
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=300
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile=$WORK/run/slurmctld.pid
SlurmdPidFile=$WORK/run/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
    # The in-job plugin strips SLURM_* variables before its own srun; this wrapper (first on
    # PATH, which sbatch carries into the job) puts the config location back.
    cat >"$WORK/bin/srun" <<WRAP
#!/bin/sh
export SLURM_CONF="$CONF"
exec /usr/bin/srun "\$@"
WRAP
    chmod +x "$WORK/bin/srun"
}

start_munge() {
    chown -R munge:munge "$MUNGE"
    chmod 0755 "$MUNGE"
    if [[ ! -f "$MUNGE/munge.key" ]]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE/munge.key"
        else
            dd if=/dev/urandom bs=1 count=1024 of="$MUNGE/munge.key" status=none
        fi
        chown munge:munge "$MUNGE/munge.key"
        chmod 0400 "$MUNGE/munge.key"
    fi
    runuser -u munge -- munged --socket="$MUNGE/munge.socket.2" --key-file="$MUNGE/munge.key" \
        --pid-file="$MUNGE/munged.pid" --log-file="$MUNGE/munged.log" --seed-file="$MUNGE/munge.seed"
}

start() {
    need_root_debian
    install_packages
    if [[ -f "$WORK/run/slurmctld.pid" ]] && kill -0 "$(cat "$WORK/run/slurmctld.pid")" 2>/dev/null; then
        echo "slurm_local: already running in $WORK"; print_env; return
    fi
    write_config
    start_munge
    SLURM_CONF="$CONF" slurmctld -f "$CONF"
    SLURM_CONF="$CONF" slurmd -f "$CONF" -N localhost
    for _ in $(seq 1 60); do
        if SLURM_CONF="$CONF" sinfo -h -o '%T' 2>/dev/null | grep -q '^idle'; then
            echo "slurm_local: node idle"; print_env; return
        fi
        sleep 0.5
    done
    echo "slurm_local: node did not become idle; see $WORK/log" >&2
    stop
    exit 1
}

stop() {
    # Only the daemons this script started, by their pid files; never by name.
    for pidfile in "$WORK/run/slurmd.pid" "$WORK/run/slurmctld.pid" "$MUNGE/munged.pid"; do
        if [[ -f "$pidfile" ]]; then
            pid=$(cat "$pidfile")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$pidfile"
        fi
    done
    rm -rf "$MUNGE"
    echo "slurm_local: stopped"
}

print_env() {
    echo "export SLURM_CONF=$CONF PATH=$WORK/bin:\$PATH"
}

case "$ACTION" in
    start) start ;;
    stop) stop ;;
    status) SLURM_CONF="$CONF" sinfo ;;
    env) print_env ;;
    *) echo "usage: $0 start|stop|status|env [WORKDIR]" >&2; exit 2 ;;
esac
