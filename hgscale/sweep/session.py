"""One invocation of ``hgscale sweep``: plan (or find the plan of the same sweep), then run here or submit to Slurm.

    plan = open_sweep(opts, sweep_id, out)      # plan.json rewritten; the same sweep's choices and parent run kept
    status = run_here(plan, say)                # every unfinished run, one after another
    status = run_on_slurm(plan, sbatch_args, argv, say)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

from hgscale.core.loader import read_json_file
from hgscale.models.flops import layer_params
from hgscale.sweep import mlflow_runs
from hgscale.sweep.options import Options, SweepError
from hgscale.sweep.plan import PLAN, budget_label, build_plan, comparisons, final_runs, kv_label, load_plan, save_plan
from hgscale.sweep.runs import Runner, diverged, finished, prepare, resolve_finals, unique

CONFIG_COPY = "config.json"


def sweep_dir(opts: Options, sweep_id: str, out: str) -> tuple[str, Path]:
    """(id, directory): --id, else the --out directory's name, else <config name>-<digest of config and options>, so
    that the same command names the same sweep."""
    read_json_file(opts.config)  # a missing or broken config: the loader's one message
    if not sweep_id:
        text = Path(opts.config).read_text(encoding="utf-8")
        sweep_id = Path(out).name if out else f"{Path(opts.config).stem}-{opts.digest(text)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", sweep_id):
        raise SweepError(f"sweep id {sweep_id!r}: use letters, digits, '.', '_' and '-' (it names a directory, MLflow "
                         f"tags and Slurm jobs)")
    return sweep_id, Path(out) if out else Path("runs") / "sweeps" / sweep_id


def open_sweep(opts: Options, sweep_id: str, out: Path) -> dict:
    """The plan of this sweep; an existing sweep directory must hold the same options and config (its parent run and
    tuning choices carry over). Raises SweepError / ConfigError before anything runs."""
    read_json_file(opts.config)  # a missing or broken config: the loader's one message
    text = Path(opts.config).read_text(encoding="utf-8")
    sha = hashlib.sha256(text.encode()).hexdigest()
    out = Path(out).resolve()
    old = load_plan(out) if (out / PLAN).is_file() else None
    if old is not None and (old["options"] != opts.to_dict() or old.get("config_sha256") != sha):
        what = "options" if old["options"] != opts.to_dict() else f"config ({opts.config} was edited since)"
        raise SweepError(f"{out} holds sweep {old['sweep']!r} with other {what}; rerun it with its own command, or "
                         f"give this one another --out / --id")
    plan = build_plan(opts, sweep_id, out, out / CONFIG_COPY)
    plan["config_sha256"] = sha
    if old is not None:
        plan["parent_run_id"], plan["created"] = old.get("parent_run_id"), old.get("created", plan["created"])
    plan["_config_text"] = text
    return plan


def write(plan: dict) -> None:
    """The config copy the runs train from (once) and plan.json."""
    text = plan.pop("_config_text", None)
    copy = Path(plan["config"])
    if text is not None and not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
    save_plan(plan)


def summary(plan: dict) -> list[str]:
    """The plan in lines: models (role, match, FLOPs per token, parameters), then each run."""
    from hgscale.config import load_config

    cfg = load_config(plan["config"] if Path(plan["config"]).is_file() else plan["options"]["config"],
                      plan["overrides"], validate=False)
    lines = [f"sweep {plan['sweep']}: {len(unique(plan['runs']))} run(s)"
             + (f" + {len(plan['pending'])} final run(s) after tuning" if plan["pending"] else "")
             + f" in {plan['out']}"]
    models = {}
    for r in plan["runs"] + plan["pending"]:
        models.setdefault(r["model"], r)
    for h, r in models.items():
        params = sum(layer_params(dataclasses.replace(cfg.model, hierarchy=h)))
        match = "; ".join(f"{m['by']}-matched to {m['hourglass']} ({m['gap']:+.1%})" for m in r["matches"])
        causal = f" (causal {r['causal_flops_per_token']:.4g})" if "causal_flops_per_token" in r else ""
        lines.append(f"  {h:24s} {r['role']:9s} {r['flops_per_token']:.4g} FLOPs/token{causal}  {params:,} parameters"
                     + (f"  {match}" if match else ""))
    for r in unique(plan["runs"]):
        lines.append(f"  {r['name']}: {r['steps']} steps x {r['tokens_per_step']} tokens = {r['flops']:.4g} FLOPs "
                     f"(budget {budget_label(r['budget'])}; {','.join(r['phases'])})")
    groups: dict[tuple, list[int]] = {}
    for p in plan["pending"]:
        groups.setdefault((p["model"], budget_label(p["budget"]), kv_label(p["cell"])), []).append(p["seed"])
    for (model, budget, cell), seeds in groups.items():
        lines.append(f"  pending: {model} at {budget}{' ' + cell if cell else ''}, seed(s) "
                     f"{','.join(map(str, seeds))}: at the tuned value, once its tuning runs are done")
    return lines


def _track(plan: dict, say) -> None:
    try:
        mlflow_runs.ensure_parent(plan)
        mlflow_runs.sync_tags(plan)
        save_plan(plan)
        mlflow_runs.log_plan(plan)
    except Exception as e:  # noqa: BLE001 - a store that does not answer: the runs still train (and track later)
        if not _transient(e):
            raise
        say(f"warning: the tracking store does not answer ({type(e).__name__}); the runs train and are tagged later")


def _transient(e: BaseException) -> bool:
    from hgscale.tracking.mlflow_sink import is_transient_tracking_error

    return is_transient_tracking_error(e)


def complete(plan: dict) -> bool:
    """Every final run chosen and finished."""
    return not plan["pending"] and all(finished(r) for r in final_runs(plan))


def _done(plan: dict, say) -> int:
    """The end of a sweep whose runs are all finished: the parent run closed, the report's command."""
    mlflow_runs.close_parent(plan, "FINISHED")
    say(f"all {len(final_runs(plan))} final run(s) of sweep {plan['sweep']} finished; compare them with:\n"
        f"  hgscale report --sweep {plan['out']}")
    return 0


def check_data(plan: dict) -> None:
    """The dataset every run reads opens (its manifest read and checked): a wrong data.url is one message before
    any run starts, not a failure per run."""
    from hgscale.config import load_config
    from hgscale.data import open_dataset

    open_dataset(load_config(plan["options"]["config"], plan["overrides"]).data)


def run_here(plan: dict, say=print) -> int:
    """Every unfinished run on this machine, one after another (tuning first, then the finals it chooses)."""
    check_data(plan)
    write(plan)
    for line in resolve_finals(plan):
        say(line)
    _track(plan, say)

    def on_plan(p):
        save_plan(p)
        mlflow_runs.log_plan(p)

    runner = Runner(plan, say, after_run=lambda run: mlflow_runs.tag_run(plan, run), on_plan=on_plan)
    skipped = [r["name"] for r in unique(plan["runs"]) if finished(r)]
    if skipped:
        say(f"{len(skipped)} run(s) finished earlier, skipped: {', '.join(skipped)}")
    status = runner.run()
    save_plan(plan)
    if runner.stopped is None and complete(plan):  # a diverged tuning value is a result, not a failure
        return _done(plan, say)
    mlflow_runs.close_parent(plan, "KILLED" if runner.stopped else "FAILED")
    left = [r["name"] for r in unique(plan["runs"]) if not finished(r) and not diverged(r)]
    shown = ", ".join(left[:6]) + (" ..." if len(left) > 6 else "")
    pending = f" and {len(plan['pending'])} final run(s) pending" if plan["pending"] else ""
    say(f"sweep {plan['sweep']}: {len(left)} run(s) unfinished ({shown}){pending}; the same command resumes them")
    return status or 1


def run_on_slurm(plan: dict, sbatch_args: list[str], argv: list[str], say=print, dry_run: bool = False,
                 after_round: int | None = None, follow_args: list[str] = ()) -> int:
    """Submit the unfinished runs as job arrays (and the follow-up job that continues the sweep)."""
    from hgscale.sweep.slurm import submit

    if not dry_run:
        write(plan)
    for line in resolve_finals(plan):
        say(line)
    todo = [r["name"] for r in unique(plan["runs"]) if not finished(r) and not diverged(r)]
    if not dry_run:
        _track(plan, say)
        save_plan(plan)
    if complete(plan):
        return 0 if dry_run else _done(plan, say)
    if not todo:
        raise SweepError(f"sweep {plan['sweep']} has no run left to train, but not every final run finished (a run "
                         f"diverged, or every tuning value of a group did); see the train.log files under "
                         f"{plan['out']}/runs")
    submit(plan, todo, sbatch_args, argv, say, dry_run=dry_run, after_round=after_round, follow_args=follow_args)
    return 0


def task_args(sweep_dir: str, name: str) -> list[str]:
    """The config and overrides of run ``name`` (for a Slurm array task), [] when it finished earlier."""
    plan = load_plan(sweep_dir)
    run = next((r for r in plan["runs"] if r["name"] == name), None)
    if run is None:
        raise SweepError(f"run {name!r} is not in {Path(sweep_dir) / PLAN}; the array was written for another plan")
    if finished(run):
        return []
    prepare(run)
    return [plan["config"], *run["overrides"]]


def describe_comparisons(plan: dict) -> list[str]:
    return [f"  compare {c['hourglass']} with {c['baseline']} ({c['by']}-matched, {c['gap']:+.1%})"
            + (f" at {kv_label(c['cell'])}" if c["cell"] else "") for c in comparisons(plan)]


def as_json(plan: dict) -> str:
    return json.dumps({k: v for k, v in plan.items() if not k.startswith("_")}, indent=1)
