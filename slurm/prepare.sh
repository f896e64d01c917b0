#!/bin/bash
# Prepare a text corpus on many machines: one array task per machine, each its own share of the inputs.
#
#   sbatch --array=0-63 slurm/prepare.sh --input 's3://bucket/crawl/*.jsonl.zst' --out s3://bucket/crawl-bytes
#   sbatch --array=0-63 --cpus-per-task=16 slurm/prepare.sh --input ... --out URL --tokenizer sentencepiece \
#       --tokenizer-model URL/tokenizer.model
#
# Arguments are those of `python -m data_pipelines.text`. Task I of N (N = the array's size, I counted from
# its first index) passes --num-tasks N --task-index I and --workers $SLURM_CPUS_PER_TASK; the inputs are cut
# into N contiguous ranges of about equal bytes, the same in every task, and each task writes its own shards
# and tasks/task-I-of-N.json. When a task finishes it tries `python -m data_pipelines.merge URL`: the merge
# refuses while any task is missing, so the last task to finish writes manifest.json. A failed task can be
# re-run alone (sbatch --array=I ... with the same arguments and the same --array size given as
# HGSCALE_NUM_TASKS=N); run the merge by hand afterwards. SentencePiece across tasks needs one shared model:
# train it first (`python -m data_pipelines.text ... --tokenizer sentencepiece --tokenizer-only`).
# Submit from the repository root with the Python environment active; HGSCALE_PYTHON names another one.
#
#SBATCH --job-name=hgscale-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.log

set -uo pipefail

USER_ERROR=""  # from hgscale.core.status
say() { echo "hgscale-prepare: $*"; }
die() { echo "hgscale-prepare: error: $*" >&2; exit "${USER_ERROR:-2}"; }
# (sbatch runs a copy of this script from its spool directory, so it sources no helper file: the few
# helpers both Slurm scripts need stand in each)
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
    echo "hgscale-prepare: error: $1 = '$shown' is not a non-negative integer (at most 10 digits: no sign," \
        "point or expression)" >&2
    return 1
}

[ -n "${SLURM_ARRAY_TASK_ID:-}" ] || die "submit this script as an array job: sbatch --array=0-63 slurm/prepare.sh ..."
[ $# -ge 1 ] || die "no arguments; usage: sbatch --array=0-N slurm/prepare.sh --input URL_OR_GLOB... --out URL [...]"
cd "${SLURM_SUBMIT_DIR:-$PWD}" || die "cannot enter the submit directory ${SLURM_SUBMIT_DIR:-}"
PY=${HGSCALE_PYTHON:-python}
# USER_ERROR from the NAME=VALUE lines of hgscale.core.status: read and checked, never eval'd
statuses=$("$PY" -m hgscale.core.status) || die "cannot read the exit statuses ($PY -m hgscale.core.status failed)"
while IFS='=' read -r name value; do
    [ "$name" = USER_ERROR ] && { USER_ERROR=$(uint "hgscale.core.status $name" "$value") || exit 2; }
done <<< "$statuses"
[ -n "$USER_ERROR" ] || die "$PY -m hgscale.core.status does not name USER_ERROR"

# every number from the environment, checked before it is used
ID=$(uint SLURM_ARRAY_TASK_ID "$SLURM_ARRAY_TASK_ID") || exit "$USER_ERROR"
FIRST=$(uint SLURM_ARRAY_TASK_MIN "${SLURM_ARRAY_TASK_MIN:-0}") || exit "$USER_ERROR"
WORKERS=$(uint SLURM_CPUS_PER_TASK "${SLURM_CPUS_PER_TASK:-1}") || exit "$USER_ERROR"
if [ -n "${HGSCALE_NUM_TASKS:-}" ]; then
    NUM_TASKS=$(uint HGSCALE_NUM_TASKS "$HGSCALE_NUM_TASKS") || exit "$USER_ERROR"
    FIRST=0   # a re-run of single tasks: indices are absolute
elif [ -n "${SLURM_ARRAY_TASK_COUNT:-}" ]; then
    NUM_TASKS=$(uint SLURM_ARRAY_TASK_COUNT "$SLURM_ARRAY_TASK_COUNT") || exit "$USER_ERROR"
else
    LAST=$(uint SLURM_ARRAY_TASK_MAX "${SLURM_ARRAY_TASK_MAX:-0}") || exit "$USER_ERROR"
    NUM_TASKS=$((LAST - FIRST + 1))
fi
TASK=$((ID - FIRST))
if [ "$TASK" -lt 0 ] || [ "$TASK" -ge "$NUM_TASKS" ]; then
    die "array task $ID is not one of the $NUM_TASKS task(s) from index $FIRST (a re-run of one task: set" \
        "HGSCALE_NUM_TASKS to the first run's --array size)"
fi

OUT=""
MERGE_ARGS=()
prev=""
for a in "$@"; do
    [ "$prev" = "--out" ] && OUT=$a
    case $prev in --s3-endpoint-url|--s3-region) MERGE_ARGS+=("$prev" "$a") ;; esac
    case $a in --out=*) OUT=${a#--out=} ;; --s3-endpoint-url=*|--s3-region=*) MERGE_ARGS+=("$a") ;; esac
    prev=$a
done
[ -n "$OUT" ] || die "no --out given"

say "task $TASK of $NUM_TASKS on $(hostname -s), $WORKERS worker(s), out $OUT"
"$PY" -m data_pipelines.text "$@" --num-tasks "$NUM_TASKS" --task-index "$TASK" --workers "$WORKERS"
rc=$?
[ "$rc" -eq 0 ] || die "task $TASK failed (exit $rc); re-run it alone with HGSCALE_NUM_TASKS=$NUM_TASKS sbatch --array=$TASK ..."

# the last task to finish writes the manifest; the others are told some are still missing
if msg=$("$PY" -m data_pipelines.merge "$OUT" "${MERGE_ARGS[@]}" 2>&1); then
    say "all $NUM_TASKS tasks finished; manifest written"
    echo "$msg"
else
    say "not merged yet: $(echo "$msg" | tail -n 1)"
fi
exit 0
