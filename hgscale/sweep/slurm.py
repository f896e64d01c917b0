"""A sweep on Slurm: a job array of the runs still to train (one run per array task), then a small follow-up job.

    submit(plan, todo, sbatch_args, argv, say)          # round N: <out>/slurm/round-N.sbatch, array + follow-up
    print(render(plan, todo, 1))                         # the script alone (--dry-run)

The array script is ``slurm/sweep_array.sh`` with its "filled in" lines replaced (the sweep directory, the runs by
task index, the repository) and its job name, array range and log path set; each task becomes
``slurm/train_multinode.sh`` for its run. The follow-up job waits for the whole array (``afterany``) and runs the
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
FOLLOW_UP = ["--ntasks=1", "--cpus-per-task=1", "--time=00:30:00"]


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


def _queued(job: str) -> bool:
    """Whether any task of ``job`` is still queued or running."""
    try:
        r = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def check_progress(plan: dict, todo: list[str], after_round: int | None) -> None:
    """Refuse a second array for a round still queued; as a follow-up job, stop when the round finished nothing."""
    rounds = _rounds(plan)
    if rounds and _queued(rounds[-1]["job"]) and after_round is None:
        raise SweepError(f"round {rounds[-1]['round']} of sweep {plan['sweep']} (job {rounds[-1]['job']}) is still "
                         f"queued or running and its follow-up job submits the next; wait for it, or scancel it first")
    if after_round is not None and rounds and rounds[-1]["round"] == after_round and \
            set(rounds[-1]["runs"]) <= set(todo):
        raise SweepError(f"none of the {len(rounds[-1]['runs'])} run(s) of round {after_round} (job "
                         f"{rounds[-1]['job']}) finished: see {Path(plan['out']) / 'slurm'} and each run's train.log; "
                         f"fix the cause and rerun the sweep command")


def commands(plan: dict, script: Path, sbatch_args: list[str], argv: list[str], round_no: int) -> tuple[list, list]:
    """(array sbatch command, follow-up sbatch command without its --dependency)."""
    again = [sys.executable, "-m", "hgscale", "sweep", *argv, "--after-round", str(round_no)]
    wrap = f"cd {shlex.quote(str(Path.cwd()))} && exec {shlex.join(again)}"
    logs = Path(plan["out"]) / "slurm"
    array = ["sbatch", "--parsable", *sbatch_args, str(script)]
    follow = ["sbatch", "--parsable", *sbatch_args, *FOLLOW_UP, f"--job-name=hgscale-sweep-{plan['sweep']}-next",
              f"--output={logs}/%x-%j.log", "--wrap", wrap]
    return array, follow


def _sbatch(cmd: list[str]) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SweepError(f"sbatch refused the job (exit status {r.returncode}): "
                         f"{(r.stderr or r.stdout).strip().splitlines()[-1:] or ['no message']}; check --sbatch")
    return r.stdout.strip().split(";")[0]


def submit(plan: dict, todo: list[str], sbatch_args: list[str], argv: list[str], say, dry_run: bool = False,
           after_round: int | None = None) -> str | None:
    """Submit the runs ``todo`` as one array and the follow-up job; returns the array's job id (None: dry run)."""
    rounds = _rounds(plan) if not dry_run else []
    round_no = len(rounds) + 1
    script = Path(plan["out"]) / "slurm" / f"round-{round_no}.sbatch"
    text = render(plan, todo, round_no)
    array, follow = commands(plan, script, sbatch_args, argv, round_no)
    if dry_run:
        say(f"# {script} (not written: --dry-run)\n{text}")
        say(f"$ {shlex.join(array)}\n$ {shlex.join(follow[:2] + ['--dependency=afterany:<array job>'] + follow[2:])}")
        return None
    if mask_args(argv) != argv:  # the follow-up job's script would hold it, readable with scontrol
        raise SweepError("the sweep's command line holds a credential; the follow-up job would carry it in its "
                         "script: pass credentials through the environment (AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_URI, "
                         "...) instead")
    if shutil.which("sbatch") is None:
        raise SweepError("sbatch is not on PATH: run --slurm on a Slurm login node, or drop --slurm to run the sweep "
                         "here one run after another")
    check_progress(plan, todo, after_round)
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    job = _sbatch(array)
    nxt = _sbatch(follow[:2] + [f"--dependency=afterany:{job}"] + follow[2:])
    rounds.append({"round": round_no, "job": job, "follow_up": nxt, "runs": todo,
                   "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    (script.parent / ROUNDS).write_text(json.dumps(rounds, indent=1))
    say(f"round {round_no}: submitted {len(todo)} run(s) as array job {job} ({script}); follow-up job {nxt} "
        f"continues the sweep when it ends (logs in {script.parent})")
    return job
