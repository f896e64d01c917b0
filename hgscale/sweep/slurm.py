"""A sweep on Slurm: job arrays of the runs still to train (one run per array task), then a small follow-up job.

    submit(plan, todo, sbatch_args, argv, say)          # round N: <out>/slurm/round-N.sbatch, arrays + follow-up
    print(render(plan, todo, 1))                         # the script alone (--dry-run)

The array script is ``slurm/sweep_array.sh`` with its "filled in" lines replaced (the sweep directory, the runs by
task index, the repository) and its job name, array range and log path set; each task becomes
``slurm/train_multinode.sh`` for its run. More runs than the cluster's MaxArraySize make several arrays
(round-N.1.sbatch, ...). The follow-up job waits for every array (``afterany``) and runs the
same ``hgscale sweep`` command again: it tags the finished runs in MLflow, chooses the tuning values of groups whose
tuning runs are done and submits their final runs as the next round, until none is left. A round after which none
of its runs finished ends the chain with one error line (in the follow-up's log): a rerun of the command by hand,
after fixing the cause, starts again. A round still queued or running is never submitted twice.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hgscale.core.secrets import mask_args
from hgscale.sweep.options import SweepError

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "slurm" / "sweep_array.sh"
ROUNDS = "rounds.json"
FOLLOW_UP = ["--ntasks=1", "--cpus-per-task=1", "--time=00:30:00"]  # before the user's: theirs override
DEFAULT_MAX_ARRAY = 1001  # Slurm's default MaxArraySize
PLACEMENT = ("--partition", "-p", "--account", "-A", "--qos", "-q", "--reservation", "--clusters", "-M")


def render(plan: dict, names: list[str], round_no: int) -> str:
    """The array script of one round: the template with the sweep's values filled in."""
    if not TEMPLATE.is_file():
        raise SweepError(f"{TEMPLATE} is missing: run hgscale sweep --slurm from a checkout of the repository")
    out = Path(plan["out"])
    fill = {
        r"^#SBATCH --job-name=.*$": f"#SBATCH --job-name=hgscale-sweep-{plan['sweep']}",
        r"^#SBATCH --array=.*$": f"#SBATCH --array=0-{len(names) - 1}",
        r"^#SBATCH --output=.*$": f"#SBATCH --output={out / 'slurm'}/%x-%A_%a.log",
        r"^SWEEP_DIR=.*$": f"SWEEP_DIR={shlex.quote(str(out))}  # round {round_no} of sweep {plan['sweep']}",
        r"^RUNS=.*$": "RUNS=(\n" + "".join(f"    {shlex.quote(n)}\n" for n in names) + ")",
        r"^REPO=.*$": f"REPO={shlex.quote(str(REPO))}",
        r"^PYTHON=.*$": f"PYTHON=${{HGSCALE_PYTHON:-{shlex.quote(sys.executable)}}}",
    }
    text = TEMPLATE.read_text()
    for pattern, line in fill.items():
        text, n = re.subn(pattern, lambda m, line=line: line, text, count=1, flags=re.M)
        if n != 1:
            raise SweepError(f"{TEMPLATE} has no line matching {pattern!r}; restore it from the repository")
    return text


def _rounds(plan: dict) -> list[dict]:
    path = Path(plan["out"]) / "slurm" / ROUNDS
    return json.loads(path.read_text()) if path.is_file() else []


def _jobs(entry: dict) -> list[str]:
    return entry.get("jobs") or [entry["job"]]  # "job": one array per round, as rounds.json once held


def _queued(jobs: list[str]) -> bool:
    """Whether any task of ``jobs`` is still queued or running."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def check_progress(plan: dict, todo: list[str], after_round: int | None) -> None:
    """Refuse a second array for a round still queued; as a follow-up job, stop when the round finished nothing."""
    rounds = _rounds(plan)
    jobs = ",".join(_jobs(rounds[-1])) if rounds else ""
    if rounds and _queued(_jobs(rounds[-1])) and after_round is None:
        raise SweepError(f"round {rounds[-1]['round']} of sweep {plan['sweep']} (job {jobs}) is still "
                         f"queued or running and its follow-up job submits the next; wait for it, or scancel it first")
    if after_round is not None and rounds and rounds[-1]["round"] == after_round and \
            set(rounds[-1]["runs"]) <= set(todo):
        raise SweepError(f"none of the {len(rounds[-1]['runs'])} run(s) of round {after_round} (job "
                         f"{jobs}) finished: see {Path(plan['out']) / 'slurm'} and each run's train.log; "
                         f"fix the cause and rerun the sweep command")


def max_array_size() -> int:
    """Slurm's MaxArraySize (array indices 0 .. MaxArraySize - 1) from ``scontrol show config``; Slurm's default, 1001,
    when scontrol does not answer."""
    try:
        r = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return DEFAULT_MAX_ARRAY
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)\s*$", r.stdout, flags=re.M)
    return int(m.group(1)) if m and int(m.group(1)) > 0 else DEFAULT_MAX_ARRAY


def follow_up_args(sbatch_args: list[str], extra: list[str]) -> list[str]:
    """The follow-up job's sbatch options: of --sbatch only where and on whose account jobs run (PLACEMENT: partition,
    account, qos, reservation, clusters), never the arrays' resources (GPUs, nodes, tasks: the job only continues the
    sweep, on one CPU for minutes); then ``extra`` (--sbatch-follow-up)."""
    out, keep_next = [], False
    for arg in sbatch_args:
        if keep_next:
            out.append(arg)
            keep_next = False
        elif arg in PLACEMENT:  # "--partition gpu", "-p gpu"
            out.append(arg)
            keep_next = True
        elif arg.split("=", 1)[0] in PLACEMENT or any(arg.startswith(f) and len(arg) > 2 for f in PLACEMENT
                                                        if len(f) == 2):  # "--partition=gpu", "-pgpu"
            out.append(arg)
    return out + list(extra)


def commands(plan: dict, scripts: list[Path], sbatch_args: list[str], follow_args: list[str], argv: list[str],
             round_no: int) -> tuple[list, list]:
    """(one sbatch command per array, the follow-up sbatch command without its --dependency)."""
    again = [sys.executable, "-m", "hgscale", "sweep", *argv, "--after-round", str(round_no)]
    wrap = f"cd {shlex.quote(str(Path.cwd()))} && exec {shlex.join(again)}"
    logs = Path(plan["out"]) / "slurm"
    arrays = [["sbatch", "--parsable", *sbatch_args, str(script)] for script in scripts]
    follow = ["sbatch", "--parsable", *FOLLOW_UP, *follow_up_args(sbatch_args, follow_args),
              f"--job-name=hgscale-sweep-{plan['sweep']}-next", f"--output={logs}/%x-%j.log", "--wrap", wrap]
    return arrays, follow


def _sbatch(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SweepError(f"sbatch refused the job (exit status {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no message']}; check --sbatch")
    return r.stdout.strip().split(";")[0]


def _scripts(plan: dict, parts: list[list[str]], round_no: int) -> list[Path]:
    """round-N.sbatch, or round-N.K.sbatch for each of several arrays (more runs than MaxArraySize)."""
    d = Path(plan["out"]) / "slurm"
    return [d / f"round-{round_no}.sbatch"] if len(parts) == 1 else \
        [d / f"round-{round_no}.{k}.sbatch" for k in range(1, len(parts) + 1)]


def submit(plan: dict, todo: list[str], sbatch_args: list[str], argv: list[str], say, dry_run: bool = False,
           after_round: int | None = None, follow_args: list[str] = ()) -> list[str] | None:
    """Submit the runs ``todo`` as job arrays of at most MaxArraySize tasks and the follow-up job that waits for all
    of them; returns the arrays' job ids (None: dry run)."""
    rounds = _rounds(plan) if not dry_run else []
    round_no = len(rounds) + 1
    size = max_array_size()
    parts = [todo[i:i + size] for i in range(0, len(todo), size)]
    scripts = _scripts(plan, parts, round_no)
    texts = [render(plan, part, round_no) for part in parts]
    arrays, follow = commands(plan, scripts, sbatch_args, list(follow_args), argv, round_no)
    if dry_run:
        for script, text, cmd in zip(scripts, texts, arrays, strict=True):
            say(f"# {script} (not written: --dry-run)\n{text}\n$ {shlex.join(cmd)}")
        say(f"$ {shlex.join(follow[:2] + ['--dependency=afterany:<array jobs>'] + follow[2:])}")
        return None
    if mask_args(argv) != argv:  # the follow-up job's script would hold it, readable with scontrol
        raise SweepError("the sweep's command line holds a credential; the follow-up job would carry it in its "
                         "script: pass credentials through the environment (AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_URI, "
                         "...) instead")
    if shutil.which("sbatch") is None:
        raise SweepError("sbatch is not on PATH: run --slurm on a Slurm login node, or drop --slurm to run the sweep "
                         "here one run after another")
    check_progress(plan, todo, after_round)
    scripts[0].parent.mkdir(parents=True, exist_ok=True)
    for script, text in zip(scripts, texts, strict=True):
        script.write_text(text)
    jobs = [_sbatch(cmd) for cmd in arrays]
    nxt = _sbatch(follow[:2] + [f"--dependency=afterany:{':'.join(jobs)}"] + follow[2:])
    rounds.append({"round": round_no, "jobs": jobs, "follow_up": nxt, "runs": todo,
                   "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    (scripts[0].parent / ROUNDS).write_text(json.dumps(rounds, indent=1))
    say(f"round {round_no}: submitted {len(todo)} run(s) as array job(s) {', '.join(jobs)} (at most {size} tasks "
        f"each, MaxArraySize); follow-up job {nxt} continues the sweep when they end (logs in {scripts[0].parent})")
    return jobs
