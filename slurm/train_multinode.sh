#!/bin/bash
# Train hgscale on a Slurm cluster: one rank per GPU on every node, checkpoint and requeue on preemption.
#
#   sbatch slurm/train_multinode.sh configs/enwik8_xl.json [key=value ...]
#   sbatch --nodes=4 --time=2-00:00:00 slurm/train_multinode.sh configs/enwik8_xl.json train.lr=3e-4
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/train_multinode.sh X  # CPU nodes (gloo)
#
# Every #SBATCH default below can be overridden on the sbatch command line (clusters still on
# select/cons_res take GPUs as --gres=gpu:N instead of --gpus-per-node). Submit from the repository
# root with the Python environment active (sbatch passes the environment on); HGSCALE_PYTHON names
# another interpreter. Relative paths (config, checkpoint.dir, run_dir) are relative to the submit dir.
#
# Why srun with one task per GPU, and not a hostfile for the `deepspeed` launcher: Slurm itself then
# starts, tracks, signals and accounts for every rank on every node. The deepspeed launcher reaches the
# other nodes over pdsh/ssh, which many clusters forbid between compute nodes, and whatever it starts
# escapes Slurm's process tracking and cgroups (CPU/GPU binding, clean-up of a killed job), and a
# preemption signal would stop at the launcher instead of reaching each rank. DeepSpeed reads no SLURM_*
# variable, so every task maps SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS to RANK / LOCAL_RANK /
# WORLD_SIZE through `python -m launchers.env` (the mapping `python -m launchers.local` also uses).
# `python -m launchers.hostlist` still writes a hostfile for running the deepspeed launcher inside salloc.
#
# Rendezvous: MASTER_ADDR is the first host of the job (HGSCALE_MASTER_ADDR picks another interface),
# MASTER_PORT is derived from the job id (HGSCALE_MASTER_PORT overrides). Before any rank starts,
# `python -m launchers.preflight` prints the rendezvous and the resolved config at the top of the log,
# validates the config against the allocation (pipeline stages x data-parallel = tasks) and checks that
# every node reaches MASTER_ADDR:MASTER_PORT (one probe task per node, HGSCALE_PROBE_TIMEOUT seconds,
# HGSCALE_SKIP_RENDEZVOUS_CHECK=1 skips it); any failure ends the job with one error line, exit != 0.
#
# Preemption and time limits: Slurm sends SIGUSR1 to this script 300 s before the end (--signal=B:...);
# the script forwards it to every rank through srun, the trainer finishes its step, saves a checkpoint
# and exits 0, and the script requeues the job (--requeue), which resumes from that checkpoint in the
# same MLflow run. A signal that lands while the ranks are still starting (importing torch) is held by
# each task's `launchers.env` wrapper until the trainer's handler exists (the default action would kill
# the rank without a checkpoint). SIGTERM (scancel, the time limit itself) is forwarded too, so the
# ranks checkpoint, but does not requeue: a cancelled job stays cancelled. HGSCALE_MAX_REQUEUES
# (default 50) caps the number of requeues. The log is appended to across requeues (--open-mode=append).
#
# Crashes and hangs: a rank that dies (any exit status but 0, 2 = config/data error, 3 = NaN loss) or a hang
# found by the trainer's watchdog (exit status 4, one line naming the stalled rank and host) ends the step
# (--kill-on-bad-exit), and the script requeues the job, which resumes from the last complete checkpoint,
# up to HGSCALE_MAX_RESTARTS times per job (default 3; preemptions do not count), after a back-off of
# HGSCALE_RESTART_BACKOFF_S seconds (default 30), doubled on every further restart. The node named by the hang
# report, or the node of the rank that died first, is excluded from the requeued job (scontrol update
# ExcNodeList), unless too few nodes would remain in the partition. Each rank's wrapper records its
# failure under HGSCALE_STATE_DIR (default .hgscale/ in the submit dir, a shared filesystem), where the
# restart count lives too. Everything the script decides is logged with a "hgscale:" prefix.
#
#SBATCH --job-name=hgscale
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -uo pipefail

say() { echo "hgscale: $*"; }
die() { echo "hgscale: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit this script with sbatch (SLURM_JOB_ID is not set)"
[ $# -ge 1 ] || die "no config given; usage: sbatch slurm/train_multinode.sh CONFIG.json [key=value ...]"
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}"
CONFIG=$1
shift
[ -f "$CONFIG" ] ||
    die "config file '$CONFIG' does not exist (relative to $PWD); pass an existing JSON file (see configs/)"
PYTHON=${HGSCALE_PYTHON:-python3}
command -v "$PYTHON" >/dev/null ||
    die "Python interpreter '$PYTHON' not found; activate the environment or set HGSCALE_PYTHON"

STATE=${HGSCALE_STATE_DIR:-$PWD/.hgscale}/job-$SLURM_JOB_ID
export HGSCALE_EVENTS_DIR=$STATE/attempt-${SLURM_RESTART_COUNT:-0}  # ranks record crashes/hangs here
rm -rf "$HGSCALE_EVENTS_DIR"
mkdir -p "$HGSCALE_EVENTS_DIR" || die "cannot create the job state directory $STATE (set HGSCALE_STATE_DIR)"

PREEMPTED=0
TERMINATED=0
SRUN_PID=
SRUN_START=0
forward() {  # srun relays the signal to every task
    [ -n "$SRUN_PID" ] || return 0
    # srun drops a signal that arrives before it has set up forwarding (its first moments)
    [ $((SECONDS - SRUN_START)) -lt 2 ] && sleep 2
    kill -"$1" "$SRUN_PID" 2>/dev/null
}
on_usr1() {
    PREEMPTED=1
    say "SIGUSR1 received: asking the ranks to checkpoint and stop"
    forward USR1
}
on_term() {
    TERMINATED=1
    say "SIGTERM received: asking the ranks to checkpoint and stop (no requeue)"
    forward TERM
}
trap on_usr1 USR1
trap on_term TERM

failed_node() {  # the node to blame: the hang report's, else that of the rank that died first
    "$PYTHON" -m launchers.faults culprit "$HGSCALE_EVENTS_DIR"
}
exclude_node() {  # keep the requeued job off NODE, unless too few nodes would be left in the partition
    local node=$1 old list total
    old=$(scontrol show job "$SLURM_JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2)
    case "$old" in ""|"(null)") list=$node ;; *) list="$old,$node" ;; esac
    total=$(sinfo -h -N -o %N ${SLURM_JOB_PARTITION:+-p "$SLURM_JOB_PARTITION"} | sort -u | wc -l)
    if [ $((total - $(echo "$list" | tr ',' '\n' | sort -u | wc -l))) -lt "${SLURM_JOB_NUM_NODES:-1}" ]; then
        say "not excluding node $node: the partition has $total node(s) and the job needs ${SLURM_JOB_NUM_NODES:-1}"
    elif scontrol update JobId="$SLURM_JOB_ID" ExcNodeList="$list"; then
        say "excluded node $node from the requeued job (ExcNodeList=$list)"
    else
        say "could not exclude node $node (scontrol update ExcNodeList=$list failed)"
    fi
}
requeue_after_failure() {  # a crash or a hang: requeue with back-off, up to HGSCALE_MAX_RESTARTS per job
    local rc=$1 count max delay node
    count=$(cat "$STATE/failures" 2>/dev/null || echo 0)
    max=${HGSCALE_MAX_RESTARTS:-3}
    if [ "$rc" -eq 4 ]; then
        say "the ranks hung (exit status 4; the watchdog's error line above names the rank and host)"
    else
        say "the ranks failed (srun exit status $rc)"
    fi
    if [ "$count" -ge "$max" ]; then
        echo "hgscale: error: restarted $count time(s) after failures already (HGSCALE_MAX_RESTARTS=$max); not" \
            "requeueing; the first error above names the cause" >&2
        exit "$rc"
    fi
    echo $((count + 1)) > "$STATE/failures"
    node=$(failed_node)
    [ -n "$node" ] && exclude_node "$node"
    delay=$(( ${HGSCALE_RESTART_BACKOFF_S:-30} * (1 << count) ))
    [ "$delay" -gt 600 ] && delay=600
    say "requeueing job $SLURM_JOB_ID after the failure (restart $((count + 1))/$max after failures) in $delay s"
    sleep "$delay"
    scontrol requeue "$SLURM_JOB_ID" || { echo "hgscale: error: scontrol requeue $SLURM_JOB_ID failed" >&2; exit "$rc"; }
    exit 0
}

say "started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) in $PWD with $(command -v "$PYTHON")"
"$PYTHON" -m launchers.preflight "$CONFIG" "$@"
rc=$?
[ $rc -eq 0 ] || { echo "hgscale: error: preflight failed (exit status $rc); no rank was started" >&2; exit $rc; }

[ $TERMINATED -eq 0 ] || { echo "hgscale: error: terminated before the ranks started" >&2; exit 143; }
if [ $PREEMPTED -eq 0 ]; then
    # One task per GPU (per --ntasks-per-node); each maps its SLURM_* variables, then runs the trainer.
    # Every task sees all GPUs of its node (--gpu-bind=none): the trainer picks cuda:LOCAL_RANK.
    srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --gpu-bind=none \
        "$PYTHON" -m launchers.env "$PYTHON" -m hgscale.train --config "$CONFIG" "$@" &
    SRUN_PID=$!
    SRUN_START=$SECONDS
    [ $PREEMPTED -eq 1 ] && forward USR1  # the signal came while srun was being started
    # A trapped signal interrupts `wait`; keep waiting until srun itself has ended.
    while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done
    wait "$SRUN_PID"
    rc=$?
    # a rank that stopped on purpose (2 config/data error, 3 NaN) took the others down with it: srun may report
    # their status (143) instead of the first rank's, so the ranks' own records decide, and nothing requeues
    stop=$("$PYTHON" -m launchers.faults stop-status "$HGSCALE_EVENTS_DIR")
    [ $rc -ne 0 ] && [ -n "$stop" ] && rc=$stop
fi

if [ $PREEMPTED -eq 1 ]; then
    restarts=${SLURM_RESTART_COUNT:-0}
    if [ $rc -ne 0 ]; then
        echo "hgscale: error: the ranks failed while stopping for preemption (exit status $rc); not requeueing" >&2
        exit $rc
    elif [ "$restarts" -ge "${HGSCALE_MAX_REQUEUES:-50}" ]; then
        echo "hgscale: error: requeued $restarts times already (HGSCALE_MAX_REQUEUES); not requeueing" >&2
        exit 1
    fi
    say "checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID" || { echo "hgscale: error: scontrol requeue $SLURM_JOB_ID failed" >&2; exit 1; }
    exit 0
fi
if [ $rc -ne 0 ] && [ $TERMINATED -eq 0 ] && [ $rc -ne 2 ] && [ $rc -ne 3 ]; then
    requeue_after_failure "$rc"  # exits
fi
if [ $rc -ne 0 ]; then
    echo "hgscale: error: the ranks failed (srun exit status $rc); the first error above names the cause" >&2
    exit $rc
fi
say "finished at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit 0
