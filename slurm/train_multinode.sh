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
# HGSCALE_SKIP_RENDEZVOUS_CHECK=1 skips it); any failure ends the job with one error line and preflight's exit
# status (USER_ERROR for the config, INFRA for an unreachable rendezvous), and is never requeued: a wrong address
# would fail the same way on every attempt.
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
# Crashes, hangs and outages (exit statuses by name from `python -m hgscale.core.status`): a rank that dies
# (any exit status but OK 0, USER_ERROR 2 = config/data error, NAN 3 = NaN loss), a hang found by the trainer's
# watchdog (HANG 4, one line naming the stalled rank and host) or an outage in a rank (INFRA 5: storage
# unreachable after retries, an upload that failed, a failed rendezvous) ends the step (--kill-on-bad-exit), and the
# script requeues the job, which resumes from the last complete checkpoint, up to HGSCALE_MAX_RESTARTS times per job
# (default 3; preemptions do not count), after a back-off of HGSCALE_RESTART_BACKOFF_S seconds (default 30),
# doubled on every further restart, at most 600. After a crash or a hang the node named by the hang report, or
# the node of the rank that died first, is excluded from the requeued job (requeued held, ExcNodeList set while it
# waits, released: Slurm refuses it for a running job), unless too few nodes would remain in the partition; with
# HGSCALE_MIN_NODES below the job's node count (default: equal), the requeued job may instead run on fewer nodes
# (as many as remain, at least that minimum) and resumes on that layout (train.grad_accum_steps=0 keeps the global
# batch); after an outage no node is excluded. Each rank's wrapper records
# its failure under HGSCALE_STATE_DIR (default .hgscale/ in the submit dir, a shared filesystem), where the
# restart count lives too. Everything the script decides is logged with a "hgscale:" prefix.
#
# Every number read from the environment or a file (HGSCALE_MAX_RESTARTS, HGSCALE_RESTART_BACKOFF_S,
# HGSCALE_MAX_REQUEUES, HGSCALE_MIN_NODES, SLURM_*, the restart count) must be a non-negative integer, digits only;
# anything else ends the job with one error line (exit status USER_ERROR) before any rank starts. No such text is
# ever evaluated: $(( )) on unchecked text would run the command substitutions inside it.
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

ST_OK="" ST_USER_ERROR="" ST_NAN="" ST_HANG="" ST_INFRA=""  # exit statuses, from hgscale.core.status
say() { echo "hgscale: $*"; }
die() { echo "hgscale: error: $*" >&2; exit "${ST_USER_ERROR:-2}"; }
# (sbatch runs a copy of this script from its spool directory, so it sources no helper file: the few
# helpers both Slurm scripts need stand in each)
# uint NAME TEXT: TEXT as a decimal non-negative integer (digits only, at most 10; "08" is 8), or one error line
# naming NAME and status 1. TEXT is only matched, never evaluated.
uint() {
    local shown
    if [[ $2 =~ ^[0123456789]{1,10}$ ]]; then  # a list, not a range: the same in every locale
        echo "$((10#$2))"
        return 0
    fi
    shown=${2:0:80}
    shown=${shown//[^[:print:]]/?}  # one line, whatever the text holds
    echo "hgscale: error: $1 = '$shown' is not a non-negative integer (at most 10 digits: no sign, point or" \
        "expression)" >&2
    return 1
}
# The exit statuses by name from `python -m hgscale.core.status` (NAME=VALUE lines): read, checked, never eval'd.
load_statuses() {
    local out name value
    out=$("$PYTHON" -m hgscale.core.status) ||
        die "cannot read the exit statuses ($PYTHON -m hgscale.core.status failed)"
    while IFS='=' read -r name value; do
        [ -n "$name" ] || continue
        value=$(uint "hgscale.core.status $name" "$value") || exit "${ST_USER_ERROR:-2}"
        case $name in
            OK) ST_OK=$value ;;
            USER_ERROR) ST_USER_ERROR=$value ;;
            NAN) ST_NAN=$value ;;
            HANG) ST_HANG=$value ;;
            INFRA) ST_INFRA=$value ;;
        esac
    done <<< "$out"
    if [ -z "$ST_OK" ] || [ -z "$ST_USER_ERROR" ] || [ -z "$ST_NAN" ] || [ -z "$ST_HANG" ] || [ -z "$ST_INFRA" ]; then
        die "$PYTHON -m hgscale.core.status does not name every exit status (OK USER_ERROR NAN HANG INFRA)"
    fi
}

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
load_statuses

# every number from the environment, checked before it is used
JOB_ID=$(uint SLURM_JOB_ID "$SLURM_JOB_ID") || exit "$ST_USER_ERROR"
RESTART_COUNT=$(uint SLURM_RESTART_COUNT "${SLURM_RESTART_COUNT:-0}") || exit "$ST_USER_ERROR"
NUM_NODES=$(uint SLURM_JOB_NUM_NODES "${SLURM_JOB_NUM_NODES:-1}") || exit "$ST_USER_ERROR"
MIN_NODES=$(uint HGSCALE_MIN_NODES "${HGSCALE_MIN_NODES:-$NUM_NODES}") || exit "$ST_USER_ERROR"
TASKS_PER_NODE=$(uint SLURM_NTASKS_PER_NODE "${SLURM_NTASKS_PER_NODE:-1}") || exit "$ST_USER_ERROR"
if [ -n "${SLURM_NTASKS_PER_NODE:-}" ]; then
    # after a shrink, the job's own task counts may still be the larger allocation's: one task per GPU of each node
    export SLURM_NTASKS=$((NUM_NODES * TASKS_PER_NODE)) SLURM_TASKS_PER_NODE="$TASKS_PER_NODE(x$NUM_NODES)"
fi
MAX_RESTARTS=$(uint HGSCALE_MAX_RESTARTS "${HGSCALE_MAX_RESTARTS:-3}") || exit "$ST_USER_ERROR"
BACKOFF_S=$(uint HGSCALE_RESTART_BACKOFF_S "${HGSCALE_RESTART_BACKOFF_S:-30}") || exit "$ST_USER_ERROR"
MAX_REQUEUES=$(uint HGSCALE_MAX_REQUEUES "${HGSCALE_MAX_REQUEUES:-50}") || exit "$ST_USER_ERROR"

STATE=${HGSCALE_STATE_DIR:-$PWD/.hgscale}/job-$JOB_ID
export HGSCALE_EVENTS_DIR=$STATE/attempt-$RESTART_COUNT  # ranks record crashes/hangs here
rm -rf "$HGSCALE_EVENTS_DIR"
mkdir -p "$HGSCALE_EVENTS_DIR" || die "cannot create the job state directory $STATE (set HGSCALE_STATE_DIR)"
# restarts after failures so far in this job: none yet, or the count this script wrote (a damaged file is refused)
FAILURES=0
if [ -e "$STATE/failures" ]; then
    FAILURES=$(uint "the restart count in $STATE/failures" "$(cat "$STATE/failures")") ||
        die "$STATE/failures is damaged; delete it to start counting restarts after failures afresh"
fi

PREEMPTED=0
TERMINATED=0
SRUN_PID=
SRUN_START=0
# shellcheck disable=SC2317  # forward, on_usr1 and on_term run from the traps
forward() {  # srun relays the signal to every task
    [ -n "$SRUN_PID" ] || return 0
    # srun drops a signal that arrives before it has set up forwarding (its first moments)
    [ $((SECONDS - SRUN_START)) -lt 2 ] && sleep 2
    kill -"$1" "$SRUN_PID" 2>/dev/null
}
# shellcheck disable=SC2317
on_usr1() {
    PREEMPTED=1
    say "SIGUSR1 received: asking the ranks to checkpoint and stop"
    forward USR1
}
# shellcheck disable=SC2317
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
EXCLUDE=""  # the requeued job's ExcNodeList, when a node is to be left out
SHRINK_TO=""  # the requeued job's node count, when it must run on fewer nodes than now
exclude_node() {  # decide to keep the requeued job off NODE (and, if need be, to shrink it to HGSCALE_MIN_NODES)
    local node=$1 old list total excluded left
    [[ $node =~ ^[A-Za-z0-9._-]+$ ]] || { say "not excluding node '$node': not a node name"; return 0; }
    old=$(scontrol show job "$JOB_ID" | grep -o 'ExcNodeList=[^ ]*' | cut -d= -f2)
    case "$old" in ""|"(null)") list=$node ;; *) list="$old,$node" ;; esac
    total=$(sinfo -h -N -o %N ${SLURM_JOB_PARTITION:+-p "$SLURM_JOB_PARTITION"} | sort -u | wc -l | tr -d ' ')
    excluded=$(echo "$list" | tr ',' '\n' | sort -u | wc -l | tr -d ' ')
    if ! total=$(uint "the partition's node count" "$total") || ! excluded=$(uint "excluded nodes" "$excluded"); then
        say "not excluding node $node: cannot count the partition's nodes"
        return 0
    fi
    left=$((total - excluded))
    if [ "$left" -ge "$NUM_NODES" ]; then
        say "excluding node $node from the requeued job (ExcNodeList=$list)"
    elif [ "$left" -ge "$MIN_NODES" ] && [ "$left" -ge 1 ]; then
        SHRINK_TO=$left
        say "excluding node $node from the requeued job (ExcNodeList=$list); it runs on $left node(s) instead" \
            "of $NUM_NODES (HGSCALE_MIN_NODES=$MIN_NODES) and resumes on that layout"
    else
        say "not excluding node $node: the partition has $total node(s) and the job needs $MIN_NODES" \
            "(HGSCALE_MIN_NODES)"
        return 0
    fi
    EXCLUDE=$list
}
requeue_job() {  # requeue; a node to exclude (or fewer nodes) is set while the job waits, held, then released
    # Slurm refuses ExcNodeList and NumNodes for a running job, and signals this script once the job is requeued:
    # the signals are ignored (by the scontrol calls too) so that the release below always runs
    trap '' TERM USR1
    if [ -z "$EXCLUDE" ]; then
        scontrol requeue "$JOB_ID"
        return
    fi
    scontrol requeuehold "$JOB_ID" || return 1
    if ! scontrol update JobId="$JOB_ID" ExcNodeList="$EXCLUDE" \
            ${SHRINK_TO:+NumNodes=$SHRINK_TO NumTasks=$((SHRINK_TO * TASKS_PER_NODE))}; then
        say "could not exclude node(s) $EXCLUDE (scontrol update failed); the job is requeued on any node"
    fi
    scontrol release "$JOB_ID"
}
requeue_after_failure() {  # a crash, a hang or an outage: requeue with back-off, up to HGSCALE_MAX_RESTARTS per job
    local rc=$1 count=$FAILURES max=$MAX_RESTARTS delay=$BACKOFF_S i=0 node
    if [ "$rc" -eq "$ST_HANG" ]; then
        say "the ranks hung (exit status $rc; the watchdog's error line above names the rank and host)"
    elif [ "$rc" -eq "$ST_INFRA" ]; then
        say "an outage (exit status $rc: storage unreachable after retries, a failed upload or rendezvous; the" \
            "error line above names it); no node is excluded"
    else
        say "the ranks failed (srun exit status $rc)"
    fi
    if [ "$count" -ge "$max" ]; then
        echo "hgscale: error: restarted $count time(s) after failures already (HGSCALE_MAX_RESTARTS=$max); not" \
            "requeueing; the first error above names the cause" >&2
        exit "$rc"
    fi
    { echo $((count + 1)) > "$STATE/failures.tmp" && mv -f "$STATE/failures.tmp" "$STATE/failures"; } ||
        { echo "hgscale: error: cannot write the restart count to $STATE/failures; not requeueing" >&2; exit "$rc"; }
    if [ "$rc" -ne "$ST_INFRA" ]; then
        node=$(failed_node)
        [ -n "$node" ] && exclude_node "$node"
    fi
    while [ "$i" -lt "$count" ] && [ "$delay" -gt 0 ] && [ "$delay" -lt 600 ]; do  # doubled per restart
        delay=$((delay * 2))
        i=$((i + 1))
    done
    [ "$delay" -gt 600 ] && delay=600
    say "requeueing job $JOB_ID after the failure (restart $((count + 1))/$max after failures) in $delay s"
    sleep "$delay"
    requeue_job || { echo "hgscale: error: scontrol requeue $JOB_ID failed" >&2; exit "$rc"; }
    exit "$ST_OK"
}

say "started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname) in $PWD with $(command -v "$PYTHON")"
"$PYTHON" -m launchers.preflight "$CONFIG" "$@"
rc=$?
[ "$rc" -eq 0 ] || { echo "hgscale: error: preflight failed (exit status $rc); no rank was started" >&2; exit "$rc"; }

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
    # a rank that stopped on purpose (USER_ERROR, NAN) took the others down with it, as does one that hit an outage
    # (INFRA): srun may report their status (143) instead of the first rank's, so the ranks' own records decide
    recorded=$("$PYTHON" -m launchers.faults status "$HGSCALE_EVENTS_DIR")
    if [ "$rc" -ne 0 ] && [ -n "$recorded" ] && recorded=$(uint "launchers.faults status" "$recorded"); then
        rc=$recorded
    fi
fi

if [ $PREEMPTED -eq 1 ]; then
    if [ "$rc" -ne 0 ]; then
        echo "hgscale: error: the ranks failed while stopping for preemption (exit status $rc); not requeueing" >&2
        exit "$rc"
    elif [ "$RESTART_COUNT" -ge "$MAX_REQUEUES" ]; then
        echo "hgscale: error: requeued $RESTART_COUNT times already (HGSCALE_MAX_REQUEUES); not requeueing" >&2
        exit 1
    fi
    say "checkpoint saved; requeueing job $JOB_ID (restart $((RESTART_COUNT + 1)))"
    requeue_job || { echo "hgscale: error: scontrol requeue $JOB_ID failed" >&2; exit 1; }
    exit "$ST_OK"
fi
if [ "$rc" -ne 0 ] && [ $TERMINATED -eq 0 ] && [ "$rc" -ne "$ST_USER_ERROR" ] && [ "$rc" -ne "$ST_NAN" ]; then
    requeue_after_failure "$rc"  # exits
fi
if [ "$rc" -ne 0 ]; then
    echo "hgscale: error: the ranks failed (srun exit status $rc); the first error above names the cause" >&2
    exit "$rc"
fi
say "finished at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
exit "$ST_OK"
