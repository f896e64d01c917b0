"""hgscale sweep's plan on the real configs: matched baselines (flops, params, depth), steps per budget, tuning runs
and the choice they make, the Slurm array script; each bad input one message (exit USER_ERROR) before anything runs;
the report's paired interval against a hand computation."""
import dataclasses
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from hgscale.commands import sweep as sweep_cmd
from hgscale.config import load_config
from hgscale.core.status import USER_ERROR
from hgscale.models.flops import flops_per_token, layer_params
from hgscale.sweep.match import match_baseline
from hgscale.sweep.options import Options, SweepError, parse_match
from hgscale.sweep.plan import build_plan, comparisons
from hgscale.sweep.runs import resolve_finals
from hgscale.sweep.slurm import follow_up_args
from hgscale.tracking.sweep_report import paired_interval, verdict

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
# demo.json narrowed so that 6@1 meets its Hourglass 2@1 8@4 2@1 within 1 % (the demo's own 2@1 2@3 2@1 has no match)
DEMO64 = ["data.seq_len=512", "model.d_model=64", "model.d_ff=256", "model.n_heads=2", "model.hierarchy=2@1 8@4 2@1"]


def _vanilla(cfg, n):
    return dataclasses.replace(cfg.model, hierarchy=f"{n}@1")


def _error(capsys, *argv) -> str:
    """Run `hgscale sweep ARGV` expecting a refusal: exit USER_ERROR, one line on stderr, no traceback."""
    assert sweep_cmd.main([*argv, "--dry-run"]) == USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_flops_match_on_imagenet32_is_the_nearest_vanilla_depth():
    cfg = load_config(CONFIGS / "imagenet32.json")
    n, gap = match_baseline(cfg.model, cfg.data.seq_len, "flops")
    hg = flops_per_token(cfg.model, cfg.data.seq_len)
    assert n == 12 and gap == pytest.approx(flops_per_token(_vanilla(cfg, 12), cfg.data.seq_len) / hg - 1)
    assert abs(gap) < 0.002  # 12@1 is within 0.2 %; 11@1 and 13@1 are further off
    for other in (11, 13):
        assert abs(flops_per_token(_vanilla(cfg, other), cfg.data.seq_len) / hg - 1) > abs(gap)


def test_depth_and_params_match_on_enwik8():
    cfg = load_config(CONFIGS / "enwik8_xl.json")
    # depth: every layer of 5@1 24@3 5@1, the paper's baseline of configs/enwik8_baseline.json
    assert match_baseline(cfg.model, cfg.data.seq_len, "depth") == (34, 0.0)
    assert load_config(CONFIGS / "enwik8_baseline.json").model.hierarchy == "34@1"
    n, gap = match_baseline(cfg.model, cfg.data.seq_len, "params")
    want = sum(layer_params(cfg.model))
    best = min(range(1, 80), key=lambda k: abs(sum(layer_params(_vanilla(cfg, k))) - want))
    assert n == best == 36 and gap == pytest.approx(sum(layer_params(_vanilla(cfg, 36))) / want - 1)


def test_no_flops_match_within_2_percent_is_one_message(capsys):
    err = _error(capsys, "--config", str(CONFIGS / "enwik8_xl.json"), "--budgets", "1e18")
    assert "no vanilla Transformer of the same width is within 2% of the training FLOPs of Hourglass '5@1 24@3 5@1'" \
        in err
    assert "17@1 +2.7% and 16@1 -3.3%" in err and "--match params or depth" in err and "--tolerance" in err
    # the suggested Hourglass does meet a vanilla depth within 2 %
    suggested = err.split("e.g. '")[1].split("'")[0]
    cfg = load_config(CONFIGS / "enwik8_xl.json", [f"model.hierarchy={suggested}"])
    assert abs(match_baseline(cfg.model, cfg.data.seq_len, "flops")[1]) <= 0.02


def test_steps_per_budget_and_the_runs_of_a_tuned_sweep(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the sweep's runs then share <out>/mlflow.db
    opts = Options(config=str(CONFIGS / "demo.json"), overrides=tuple(DEMO64), budgets=(3e13, 1e14), seeds=2,
                   tune=(("train.lr", ("1e-3", "2e-3")),), match=("flops",))
    plan = build_plan(opts, "t", tmp_path, tmp_path / "config.json")
    cfg = load_config(CONFIGS / "demo.json", DEMO64)
    tokens = 8 * 1 * 512  # micro-batch x accumulation x seq_len, one process
    for model in ("2@1 8@4 2@1", "6@1"):
        fpt = flops_per_token(dataclasses.replace(cfg.model, hierarchy=model), 512)
        for budget in (3e13, 1e14):
            runs = [r for r in plan["runs"] if r["model"] == model and r["budget"] == budget]
            assert {r["steps"] for r in runs} == {math.floor(budget / (fpt * tokens) + 0.5)}
            assert runs[0]["flops"] == pytest.approx(runs[0]["steps"] * fpt * tokens)
            assert runs[0]["steps"] % runs[0]["eval_interval"] == 0  # the final step is validated
            assert sorted(r["tune"]["train.lr"] for r in runs) == ["1e-3", "2e-3"]  # each value, seed 0
    assert plan["runs"][0]["steps"] == 1340 and [r for r in plan["runs"] if r["model"] == "6@1"][0]["steps"] == 1330
    assert len(plan["pending"]) == 2 * 2 * 2  # models x budgets x seeds, waiting for their tuning runs
    run = plan["runs"][0]
    where = tmp_path.resolve() / "runs" / run["name"]
    assert run["name"] == "2@1-8@4-2@1_3e13_train.lr=1e-3_s0"
    assert run["overrides"] == [
        *DEMO64, f"tracking.uri=sqlite:///{tmp_path.resolve() / 'mlflow.db'}", "train.lr=1e-3",
        "model.hierarchy=2@1 8@4 2@1", "train.steps=1340", f"train.seed={cfg.train.seed}", f"data.seed={cfg.data.seed}",
        "train.eval_interval=335", f"run_dir={where}", f"checkpoint.dir={where / 'checkpoints'}",
        "checkpoint.resume=auto", f"tracking.run_name=t/{run['name']}"]


def test_causal_match_counts_only_the_pairs_attention_sees():
    """At T 512 attention is most of a d 64 model's FLOPs and the Hourglass shortens it: over visible pairs only the
    FLOPs-matched 6@1 is 2.8 % cheaper, outside the default tolerance."""
    cfg = load_config(CONFIGS / "demo.json", DEMO64)
    hg, base = (flops_per_token(m, 512, causal=True) for m in (cfg.model, _vanilla(cfg, 6)))
    assert match_baseline(cfg.model, 512, "causal", tolerance=0.03) == (6, pytest.approx(base / hg - 1))
    assert base / hg - 1 == pytest.approx(-0.028, abs=5e-4)
    with pytest.raises(SweepError, match=r"--match causal: .* causal training FLOPs .* nearest are 6@1 -2\.8% and 7@1"):
        match_baseline(cfg.model, 512, "causal")


def test_match_none_trains_the_listed_models_alone_in_each_cell(tmp_path):
    opts = Options(config=str(CONFIGS / "demo.json"), overrides=tuple(DEMO64), budgets=(3e13,), seeds=2,
                   match=parse_match("none"), grid=(("model.init_layers", ("down=normal", "shortened=normal")),))
    plan = build_plan(opts, "t", tmp_path, tmp_path / "config.json")
    assert [(r["model"], r["role"], r["cell"]["model.init_layers"], r["seed"]) for r in plan["runs"]] == [
        ("2@1 8@4 2@1", "hourglass", cell, s) for cell in ("down=normal", "shortened=normal") for s in (0, 1)]
    assert comparisons(plan) == []


def _trained(run: dict, bpc: float) -> None:
    """What a finished training run leaves: its final checkpoint and the validation record of its last step."""
    tag = Path(run["checkpoint_dir"]) / f"step{run['steps']:08d}"
    tag.mkdir(parents=True)
    (tag / "COMPLETE").write_text("")
    (Path(run["checkpoint_dir"]) / "latest").write_text(tag.name)
    (Path(run["run_dir"]) / "metrics.jsonl").write_text(json.dumps({"step": run["steps"], "val/bpc": bpc}) + "\n")


def test_final_runs_take_each_models_best_tuning_value(tmp_path):
    opts = Options(config=str(CONFIGS / "demo.json"), overrides=tuple(DEMO64), budgets=(3e13,), seeds=2,
                   tune=(("train.lr", ("1e-3", "2e-3")),))
    plan = build_plan(opts, "t", tmp_path, tmp_path / "config.json")
    bpc = {("2@1 8@4 2@1", "1e-3"): 2.5, ("2@1 8@4 2@1", "2e-3"): 2.4, ("6@1", "1e-3"): 2.6, ("6@1", "2e-3"): 2.7}
    assert resolve_finals(plan) == [] and len(plan["pending"]) == 4  # nothing trained yet: nothing chosen
    for r in plan["runs"]:
        _trained(r, bpc[(r["model"], r["tune"]["train.lr"])])
    said = resolve_finals(plan)
    assert len(said) == 2 and "'2@1 8@4 2@1' at 3e13 FLOPs: train.lr=2e-3" in said[0] and not plan["pending"]
    finals = {(r["model"], r["seed"]): r for r in plan["runs"] if "final" in r["phases"]}
    assert {k: r["tune"]["train.lr"] for k, r in finals.items()} == {
        ("2@1 8@4 2@1", 0): "2e-3", ("2@1 8@4 2@1", 1): "2e-3", ("6@1", 0): "1e-3", ("6@1", 1): "1e-3"}
    # final seed 0 is the tuning run at the chosen value (trained once); seed 1 is a new run
    assert finals[("6@1", 0)]["phases"] == ["final", "tune"] and finals[("6@1", 1)]["phases"] == ["final"]
    assert finals[("6@1", 1)]["name"] == "6@1_3e13_train.lr=1e-3_s1" and "train.lr=1e-3" in finals[("6@1", 1)][
        "overrides"] and f"train.seed={plan['seeds']['train'] + 1}" in finals[("6@1", 1)]["overrides"]


def test_a_diverged_tuning_value_counts_as_the_worst(tmp_path):
    opts = Options(config=str(CONFIGS / "demo.json"), overrides=tuple(DEMO64), budgets=(3e13,),
                   tune=(("train.lr", ("1e-3", "8e-3")),))
    plan = build_plan(opts, "t", tmp_path, tmp_path / "config.json")
    for r in plan["runs"]:
        if r["tune"]["train.lr"] == "8e-3" and r["model"] == "6@1":  # what the trainer leaves when it stops on NaN
            Path(r["run_dir"]).mkdir(parents=True)
            (Path(r["run_dir"]) / "metrics.jsonl").write_text('{"step": 9, "train/loss": 3.1}\n'
                                                              '{"step": 10, "train/diverged": 1.0}\n')
        else:
            _trained(r, {"1e-3": 2.5, "8e-3": 2.4}[r["tune"]["train.lr"]])
    resolve_finals(plan)
    assert {r["model"]: r["tune"]["train.lr"] for r in plan["runs"] if "final" in r["phases"]} == {
        "2@1 8@4 2@1": "8e-3", "6@1": "1e-3"}


@pytest.mark.parametrize("argv, says", [
    (["--budgets", "1e6"], "--budgets 1e6 is too small for one optimizer step of '6@1' (2.25e+10 FLOPs"),
    (["--budgets", "1e14", "--grid", "model.initt=trax,normal"], "unknown key model.initt; did you mean model.init?"),
    (["--budgets", "1e14", "--tune", "train.lrr=1e-3,2e-3"], "unknown key train.lrr; did you mean train.lr?"),
    (["--budgets", "1e14", "--tune", "model.d_ff=128,512"], "--tune model.d_ff=128 changes the FLOPs of a step"),
    (["--budgets", "1e14", "--grid", "train.steps=10,20"], "the sweep sets train.steps itself"),
    (["--budgets", "lots"], "--budgets 'lots': 'lots' is not a positive number of training FLOPs"),
    (["--budgets", "1e14", "--match", "width"], "'width' is not one of flops, causal, params, depth, none"),
    (["--budgets", "1e14", "--match", "flops,none"], "none (no baselines) cannot be combined with a match"),
    (["--budgets", "1e14", "--id", "a b"], "sweep id 'a b': use letters, digits"),
])
def test_bad_inputs_are_one_message_each(capsys, argv, says):
    err = _error(capsys, "--config", str(CONFIGS / "demo.json"), *DEMO64, *argv)
    assert says in err, err
    if "too small" in err:
        assert "give budgets of at least 2.25e+10" in err


def test_a_missing_config_is_one_message(tmp_path, capsys):
    err = _error(capsys, "--config", str(tmp_path / "nope.json"), "--budgets", "1e14")
    assert f"config file '{tmp_path / 'nope.json'}' does not exist" in err


def test_the_slurm_array_script_lists_the_runs_and_passes_shellcheck(tmp_path, capsys):
    out = tmp_path / "sweep"
    # overrides between the options: without them demo.json's own hierarchy has no baseline within 2 %
    assert sweep_cmd.main(["--config", str(CONFIGS / "demo.json"), "--budgets", "3e13", *DEMO64, "--seeds", "2",
                           "--out", str(out), "--slurm", "--dry-run", "--sbatch=--partition=gpu --gpus-per-node=4",
                           "--sbatch-follow-up=--time=5"]) == 0
    text = capsys.readouterr().out
    script = text.split("(not written: --dry-run)\n", 1)[1].split("\n$ sbatch", 1)[0]
    assert "#SBATCH --array=0-3" in script and "#SBATCH --job-name=hgscale-sweep-sweep" in script
    assert "    2@1-8@4-2@1_3e13_s1\n    6@1_3e13_s0\n" in script and f"SWEEP_DIR={out.resolve()}" in script
    assert f"$ sbatch --parsable --partition=gpu --gpus-per-node=4 {out.resolve()}/slurm/round-1.sbatch" in text
    # the follow-up job: one CPU where the arrays run (their partition), no GPUs; --sbatch-follow-up last
    follow = next(line for line in text.splitlines() if "--dependency=afterany:<array jobs>" in line)
    head = follow.split("--wrap")[0]
    assert " --ntasks=1 --cpus-per-task=1 --time=00:30:00 --partition=gpu --time=5 --job-name=" in head
    assert "gpus-per-node" not in head
    assert not out.exists()  # a dry run writes nothing
    if shutil.which("shellcheck"):
        (tmp_path / "round.sbatch").write_text(script)
        r = subprocess.run(["shellcheck", str(tmp_path / "round.sbatch")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_the_follow_up_job_takes_only_where_and_on_whose_account_jobs_run():
    args = ["--partition", "gpu", "-A", "proj", "--qos=high", "-pbig", "--gpus-per-node=8", "--gres", "gpu:8",
            "--reservation=r1", "-N", "4", "--clusters=c2", "--exclusive"]
    assert follow_up_args(args, ["--time=5"]) == ["--partition", "gpu", "-A", "proj", "--qos=high", "-pbig",
                                                  "--reservation=r1", "--clusters=c2", "--time=5"]


def test_paired_interval_against_a_hand_computation():
    # Hourglass - baseline on three seeds: mean -0.05, sd 0.02, t(0.975, 2) = 4.302653 -> half-width 0.049683
    got = paired_interval([-0.05, -0.03, -0.07])
    half = 4.302652729911275 * 0.02 / math.sqrt(3)
    assert got["n"] == 3 and got["mean"] == pytest.approx(-0.05) and got["sd"] == pytest.approx(0.02)
    assert got["lo"] == pytest.approx(-0.05 - half) and got["hi"] == pytest.approx(-0.05 + half)
    g = {"budget": 3e14, "cell": {}, "hourglass": "2@1 8@4 2@1", "baseline": "6@1", "by": "flops", **got}
    assert verdict(g, "bpc") == ("at 3e14 FLOPs: Hourglass 2@1 8@4 2@1 better than 6@1 (flops-matched) by 0.0500 bpc "
                                 "(95 % CI [0.0003, 0.0997], 3 seeds)")
    worse = {**g, **paired_interval([0.05, 0.03, 0.07])}
    assert "worse than 6@1 (flops-matched) by 0.0500 bpc (95 % CI [0.0003, 0.0997], 3 seeds)" in verdict(worse, "bpc")
    unresolved = {**g, **paired_interval([0.05, -0.03, 0.01])}
    assert "no difference resolved: gap +0.0100 bpc (95 % CI [-0.0894, +0.1094], 3 seeds)" in verdict(unresolved, "bpc")
    one = {**g, **paired_interval([-0.02])}
    assert one["lo"] is None and "from 1 seed; no interval from one seed" in verdict(one, "bpc")
