"""benchmarks/sweep_study.py on sweeps whose runs leave known final values: the comparisons across --grid cells
(best init against best init, trax - normal, each ablation cell - the control), paired by seed."""
import json
from pathlib import Path

import pytest

from hgscale.sweep.options import Options
from hgscale.sweep.plan import build_plan, final_runs, save_plan

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "demo.json")
DEMO64 = ("data.seq_len=512", "model.d_model=64", "model.d_ff=256", "model.n_heads=2", "model.hierarchy=2@1 8@4 2@1")


def _finish(plan: dict, bpc) -> None:
    """Each final run as training leaves it (final checkpoint, validation at its last step), at bpc(run)."""
    for run in final_runs(plan):
        tag = Path(run["checkpoint_dir"]) / f"step{run['steps']:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text("")
        (Path(run["checkpoint_dir"]) / "latest").write_text(tag.name)
        (Path(run["run_dir"]) / "metrics.jsonl").write_text(json.dumps({"step": run["steps"], "val/bpc": bpc(run)}))
    save_plan(plan)


def test_study_tables_pair_seeds_across_cells(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import sweep_study

    main = build_plan(Options(config=CONFIG, overrides=DEMO64, budgets=(3e13,), seeds=3,
                              grid=(("model.init", ("trax", "normal")),)), "m", tmp_path / "m", tmp_path / "c.json")
    # seed s: Hourglass trax 2.50 + s/100, normal 2.40 + s/50; 6@1 trax 2.45 + s/100, normal 2.60 + s/100
    base = {("2@1 8@4 2@1", "trax"): 2.50, ("2@1 8@4 2@1", "normal"): 2.40, ("6@1", "trax"): 2.45,
            ("6@1", "normal"): 2.60}
    _finish(main, lambda r: base[r["model"], r["cell"]["model.init"]] + r["seed"] * (
        0.02 if (r["model"], r["cell"]["model.init"]) == ("2@1 8@4 2@1", "normal") else 0.01))
    abl = build_plan(Options(config=CONFIG, overrides=DEMO64, budgets=(3e13,), seeds=2, match=(),
                             grid=(("model.init_layers", ('""', "down=normal")),)), "a", tmp_path / "a",
                     tmp_path / "c.json")
    _finish(abl, lambda r: 2.5 - (0.1 + 0.01 * r["seed"]) * (r["cell"]["model.init_layers"] == "down=normal"))
    warm = build_plan(Options(config=CONFIG, overrides=DEMO64, budgets=(3e13,), seeds=2, match=(),
                              grid=(("train.warmup_steps", ("10", "0", "40")),)), "w", tmp_path / "w",
                      tmp_path / "c.json")
    _finish(warm, lambda r: 2.5 + int(r["cell"]["train.warmup_steps"]) / 100 + r["seed"] / 1000)

    recipe = build_plan(Options(config=CONFIG, overrides=(*DEMO64, "model.init_layers=full=normal"), budgets=(3e13,),
                                seeds=3), "r", tmp_path / "r", tmp_path / "c.json")
    _finish(recipe, lambda r: 2.3 + r["seed"] / 100)  # 6@1: 0.15 below its trax runs, seed by seed

    assert sweep_study.main(["--sweep", f"demo={tmp_path / 'm'}", "--ablation", f"demo={tmp_path / 'a'}",
                             "--ablation", f"other={tmp_path / 'w'}",
                             "--recipe", f"demo={tmp_path / 'r'}", "--out", str(tmp_path / "s.json"),
                             "--md", str(tmp_path / "s.md")]) == 0
    study = json.loads((tmp_path / "s.json").read_text())["sweeps"]["demo"]
    (best,) = study["best_vs_best"]  # Hourglass at normal (2.42 mean) against 6@1 at trax (2.46 mean)
    assert (best["hg_cell"], best["base_cell"], best["seeds"]) == ("model.init=normal", "model.init=trax", 3)
    assert best["mean"] == pytest.approx(-0.04, abs=1e-12) and best["sd"] == pytest.approx(0.01)
    effect = {e["model"]: e for e in study["init_effect"]}
    assert effect["2@1 8@4 2@1"]["d_mean"] == pytest.approx(0.10 - 0.01) and effect["6@1"]["d_mean"] == \
        pytest.approx(-0.15)
    (ablation,) = json.loads((tmp_path / "s.json").read_text())["ablations"]["demo"]
    assert (ablation["value"], ablation["d_seeds"]) == ("down=normal", 2)
    assert ablation["d_mean"] == pytest.approx(-0.105) and ablation["d_lo"] < -0.105 < ablation["d_hi"]
    warmup = json.loads((tmp_path / "s.json").read_text())["ablations"]["other"]  # any key; control: the first value
    assert [(e["key"], e["control"], e["value"], e["d_seeds"]) for e in warmup] == [("train.warmup_steps", "10", v, 2)
                                                                                      for v in ("0", "40")]
    assert [e["d_mean"] for e in warmup] == pytest.approx([-0.10, 0.30]) and warmup[0]["d_sd"] == pytest.approx(0)
    assert "| corpus | model | budget | train.warmup_steps | bpc | control (10) bpc | gap, 95 % CI |" in \
        (tmp_path / "s.md").read_text()
    against = {(e["model"], e["cell"]): e for e in json.loads((tmp_path / "s.json").read_text())["recipes"]["demo"]}
    assert len(against) == 4 and against[("6@1", "model.init=trax")]["d_mean"] == pytest.approx(-0.15)
    assert against[("6@1", "model.init=trax")]["d_sd"] == pytest.approx(0, abs=1e-12)
    assert against[("2@1 8@4 2@1", "model.init=normal")]["d_mean"] == pytest.approx(2.31 - 2.42)
    row = "| demo | 3e13 | 2@1 8@4 2@1 (normal, —) | 2.4200 | 6@1 (trax, —) | 2.4600 | -0.0400 [-0.0648, -0.0152] |"
    assert row in (tmp_path / "s.md").read_text()


def test_an_ablation_of_two_keys_or_a_recipe_without_its_sweep_is_one_error(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import sweep_study

    two = build_plan(Options(config=CONFIG, overrides=DEMO64, budgets=(3e13,), seeds=1, match=(),
                             grid=(("model.init", ("trax", "normal")), ("train.warmup_steps", ("0", "10")))),
                     "t", tmp_path / "t", tmp_path / "c.json")
    save_plan(two)
    for argv, why in ((["--ablation", f"x={tmp_path / 't'}"], "needs exactly one --grid key"),
                      (["--recipe", f"x={tmp_path / 't'}"], "give the main sweep of 'x' too (--sweep x=DIR)")):
        with pytest.raises(SystemExit) as e:
            sweep_study.main([*argv, "--out", str(tmp_path / "s.json")])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
