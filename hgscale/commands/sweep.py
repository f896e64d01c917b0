"""``hgscale sweep``: Hourglass against matched vanilla Transformers at equal training compute (hgscale.sweep).

    hgscale sweep --config configs/demo.json --budgets 3e14,1e15 --seeds 3 [--match flops] [key=value ...]
    hgscale sweep --config C --models "2@1 8@4 2@1,3@1 6@3 3@1" --match flops,depth --budgets 1e15
    hgscale sweep --config C --budgets 3e14 --seeds 3 --tune train.lr=5e-4,1e-3,2e-3,4e-3 --grid model.init=trax,normal
    hgscale sweep ... --slurm [--sbatch="--partition=gpu --gpus-per-node=8 --ntasks-per-node=8"] [--dry-run]
"""
from __future__ import annotations

import argparse
import shlex
import sys

from hgscale.core.status import InfraError, UserError, status_of

DESCRIPTION = __doc__.split("\n")[0].split(": ", 1)[1]
EPILOG = """\
models: the config's hierarchy, or each of --models; every Hourglass among them gets its baselines, vanilla N@1
  Transformers of the same width (every other model key kept): --match flops = the N whose analytic training FLOPs
  per token is closest (refused when none is within --tolerance, 2 %), causal = the same over the (query, key) pairs
  attention sees (what kernels that skip the masked half execute), params = closest parameter count, depth = the
  Hourglass's total layer count; none = no baselines (the listed models alone, e.g. init variants in --grid cells).
budgets: training FLOPs; each model trains round(budget / (FLOPs per token x tokens per step)) steps, its cosine
  (train.decay_steps 0) over those steps; validation every divisor of the steps closest to --evals per run, so the
  final step is always validated. Seed i sets train.seed and data.seed to the config's plus i: run i of every
  model sees the same data order, and the report pairs runs by seed.
tuning (--tune KEY=V1,V2,..., several for a product): every model gets the same tuning runs at every budget and
  grid cell, each value at seeds 0..--tune-seeds-1 (seed 0 by default); then its final seeds run at the value with
  its lowest mean final validation bpc, so the comparison is between equally tuned models (the tuning run at the
  chosen value and seed 0 is also final seed 0: the same config, trained once). A tuning run that diverges (exit
  status NAN) counts as the worst value and is not rerun.
runs: each is `hgscale train --config <out>/config.json <overrides>` in its own process, in <out>/runs/NAME
  (run_dir, checkpoint.dir = run_dir/checkpoints, train.log), tracked in MLflow with the tags hgscale.sweep (the id),
  .model, .budget, .seed, .cell, .tune under a parent run holding plan.json; without tracking.uri or
  MLFLOW_TRACKING_URI the store is sqlite:///<out>/mlflow.db. plan.json lists every run (name, overrides, steps,
  FLOPs) before anything runs. Rerunning the same command skips finished runs (final checkpoint and validation
  recorded) and resumes the others from their checkpoints; Ctrl-C stops the current run with a checkpoint.
--slurm: job arrays, one run per task and at most MaxArraySize tasks each (slurm/sweep_array.sh, each task running
  slurm/train_multinode.sh: requeue on preemption, resume), and a follow-up job (one CPU: of --sbatch it takes only
  where and on whose account jobs run, plus --sbatch-follow-up) that continues the sweep (tags, tuned final runs) when
  they end; the
  sweep directory must be on a shared filesystem, and with a tracking store other than a server, on one that
  SQLite can lock. Compare with `hgscale report --sweep ID`."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hgscale sweep", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="the training config every run starts from (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides for every run, e.g. data.url=data/demo")
    p.add_argument("--models", default="", help='hierarchies to compare, comma-separated, e.g. "2@1 8@4 2@1,3@1 6@3 '
                                                '3@1" (default: the config\'s model.hierarchy)')
    p.add_argument("--match", default="flops", help="baselines per Hourglass: flops, causal, params, depth "
                                                    "(comma-separated), or none")
    p.add_argument("--tolerance", type=float, default=0.02, help="--match flops: the largest relative gap (0.02)")
    p.add_argument("--budgets", default="", help="training FLOPs per comparison, comma-separated, e.g. 3e14,1e15")
    p.add_argument("--seeds", type=int, default=1, help="final runs per model and budget (seeds 0..N-1)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values; several --grid make a cartesian product of cells")
    p.add_argument("--tune", action="append", default=[], metavar="KEY=V1,V2",
                   help="a key tuned per model, budget and cell, e.g. train.lr=5e-4,1e-3,2e-3,4e-3")
    p.add_argument("--tune-seeds", type=int, default=1, help="seeds per tuning value (default 1: seed 0)")
    p.add_argument("--evals", type=int, default=4, help="validations per run, about (default 4; always the last step)")
    p.add_argument("--world-size", type=int, default=0,
                   help="processes per run, which set its global batch (default: what the config's batch sizes and "
                        "pipeline stages imply); here more than 1 run through launchers.local, on Slurm per array task")
    p.add_argument("--id", default="", help="the sweep's id (default: the --out directory's name, else "
                                            "<config name>-<hash of config and options>)")
    p.add_argument("--out", default="", help="the sweep directory (default runs/sweeps/<id>)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (with --slurm, the array script and sbatch "
                                                          "commands) and run nothing")
    p.add_argument("--slurm", action="store_true", help="submit a Slurm job array instead of running here")
    p.add_argument("--sbatch", default="",
                   help='extra sbatch options for the arrays, written --sbatch="--partition=gpu --gpus-per-node=4"; '
                        'the follow-up job takes only their partition, account, qos, reservation and clusters')
    p.add_argument("--sbatch-follow-up", default="",
                   help='extra sbatch options for the follow-up job (one CPU, 30 min), e.g. '
                        '--sbatch-follow-up="--partition=cpu"')
    p.add_argument("--task", nargs=2, metavar=("SWEEP_DIR", "RUN"),
                   help="(used by the array tasks) print run RUN's config and overrides, NUL-separated")
    p.add_argument("--after-round", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _options(a: argparse.Namespace):
    from hgscale.sweep.options import Options, parse_budgets, parse_match, parse_models, parse_values

    if not a.config:
        raise UserError("no config given: hgscale sweep --config CONFIG --budgets B1,B2 (see --help)")
    return Options(config=a.config, overrides=tuple(a.overrides), models=parse_models(a.models) if a.models else (),
                   match=parse_match(a.match), budgets=parse_budgets(a.budgets), seeds=a.seeds,
                   grid=tuple(parse_values(g, "--grid") for g in a.grid),
                   tune=tuple(parse_values(t, "--tune") for t in a.tune), tune_seeds=a.tune_seeds,
                   world_size=a.world_size, evals=a.evals, tolerance=a.tolerance)


def _argv_again(argv: list[str]) -> list[str]:
    """The command line for the follow-up job: without --dry-run and --after-round (it adds its own)."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--after-round=") or arg == "--dry-run":
            skip = False
            continue
        if arg == "--after-round":
            skip = True
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser().parse_intermixed_args(argv)  # overrides before, between or after the options
    from hgscale.sweep import session

    try:
        if a.task:
            sys.stdout.write("".join(f"{x}\0" for x in session.task_args(*a.task)))
            return 0
        opts = _options(a)
        plan = session.open_sweep(opts, *session.sweep_dir(opts, a.id, a.out))
        print("\n".join(session.summary(plan) + session.describe_comparisons(plan)), flush=True)
        if a.slurm:
            return session.run_on_slurm(plan, shlex.split(a.sbatch), _argv_again(argv), dry_run=a.dry_run,
                                        after_round=a.after_round, follow_args=shlex.split(a.sbatch_follow_up))
        return 0 if a.dry_run else session.run_here(plan)
    except (UserError, InfraError) as e:  # the config loader's, the sweep's, the data's: one message, before any run
        print(f"error: {e}", file=sys.stderr)
        return status_of(e)
