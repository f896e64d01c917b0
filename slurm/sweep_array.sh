#!/bin/bash
# One run of an hgscale sweep per array task. `hgscale sweep --slurm` writes a copy of this script into the sweep
# directory (slurm/round-N.sbatch) with the lines marked "filled in" below replaced, and submits it:
#
#   hgscale sweep --config configs/demo.json --budgets 3e14,1e15 --seeds 3 --slurm [--sbatch="--partition=gpu"]
#   hgscale sweep ... --slurm --dry-run          # print the script and the sbatch commands, submit nothing
#
# Task I looks up run RUNS[I] with `hgscale sweep --task SWEEP_DIR NAME`, which prints the run's config and
# overrides (NUL-separated), or nothing when the run finished earlier; then the task becomes
# slurm/train_multinode.sh with them (exec: the same process, so Slurm's signals reach it), which starts one rank
# per task with srun, checkpoints and requeues this array task on preemption (SIGUSR1 300 s before the time
# limit), requeues it after a crash, hang or outage, and resumes from the run's own checkpoint.dir. Everything that
# script documents holds per array task; its #SBATCH lines do not apply (those below do, and the sbatch command
# line overrides them). The sweep directory and the submit directory must be on a filesystem every node shares.
#
#SBATCH --job-name=hgscale-sweep
#SBATCH --array=0-0
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%A_%a.log
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue

set -uo pipefail

SWEEP_DIR=""              # filled in: the sweep directory (holding plan.json)
RUNS=()                   # filled in: the run of each array task, by index
REPO=""                   # filled in: the repository the sweep was planned in (holding slurm/train_multinode.sh)
PYTHON=${HGSCALE_PYTHON:-python3}

USER_ERROR=""  # from hgscale.core.status
say() { echo "hgscale-sweep: $*"; }
die() { echo "hgscale-sweep: error: $*" >&2; exit "${USER_ERROR:-2}"; }
# (sbatch runs a copy of this script from its spool directory, so it sources no helper file: the few
# helpers the Slurm scripts need stand in each)
# uint NAME TEXT: TEXT as a decimal non-negative integer (digits only, at most 10), else one error line naming
# NAME and status 1. TEXT is only matched, never evaluated ($(( )) on it would run its command substitutions).
uint() {
    local shown
    if [[ $2 =~ ^[0123456789]{1,10}$ ]]; then  # a list, not a range: the same in every locale
        echo "$((10#$2))"
        return 0
    fi
    shown=${2:0:80}
    shown=${shown//[^[:print:]]/?}
    echo "hgscale-sweep: error: $1 = '$shown' is not a non-negative integer (at most 10 digits: no sign," \
        "point or expression)" >&2
    return 1
}

[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "submit this script as an array job (hgscale sweep --slurm writes and submits it)"
if [ -z "$SWEEP_DIR" ] || [ "${#RUNS[@]}" -eq 0 ]; then
    die "this is the template of hgscale sweep --slurm: submit the copy it writes into the sweep directory"
fi
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}"
command -v "$PYTHON" >/dev/null ||
    die "Python interpreter '$PYTHON' not found; activate the environment or set HGSCALE_PYTHON"
# USER_ERROR from the NAME=VALUE lines of hgscale.core.status: read and checked, never eval'd
statuses=$("$PYTHON" -m hgscale.core.status) || die "cannot read the exit statuses ($PYTHON -m hgscale.core.status failed)"
while IFS='=' read -r name value; do
    [ "$name" = USER_ERROR ] && { USER_ERROR=$(uint "hgscale.core.status $name" "$value") || exit 2; }
done <<< "$statuses"
[ -n "$USER_ERROR" ] || die "$PYTHON -m hgscale.core.status does not name USER_ERROR"

ID=$(uint SLURM_ARRAY_TASK_ID "$SLURM_ARRAY_TASK_ID") || exit "$USER_ERROR"
[ "$ID" -lt "${#RUNS[@]}" ] || die "array task $ID has no run: this array holds ${#RUNS[@]} (indices 0-$((${#RUNS[@]} - 1)))"
NAME=${RUNS[$ID]}
ARGS_FILE=$(mktemp) || die "cannot create a temporary file"
"$PYTHON" -m hgscale sweep --task "$SWEEP_DIR" "$NAME" > "$ARGS_FILE"
rc=$?
ARGS=()
mapfile -d '' -t ARGS < "$ARGS_FILE"
rm -f "$ARGS_FILE"
[ "$rc" -eq 0 ] || { echo "hgscale-sweep: error: cannot look up run $NAME in $SWEEP_DIR (exit status $rc)" >&2; exit "$rc"; }
if [ "${#ARGS[@]}" -eq 0 ]; then
    say "run $NAME finished earlier; nothing to do"
    exit 0
fi
say "array task $ID: run $NAME"
export HGSCALE_PYTHON=$PYTHON
exec bash "$REPO/slurm/train_multinode.sh" "${ARGS[@]}"
