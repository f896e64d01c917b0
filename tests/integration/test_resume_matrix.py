"""Exact resume on another layout, with real launches on CPU (gloo, fp32, dropout 0).

Six uninterrupted 16-step runs with the same global batch of 4 (2 data-parallel ranks ZeRO-1 and ZeRO-2; 1 rank
ZeRO-1 and ZeRO-0 with accumulation 2; 2 pipeline stages; 2 ranks sharing each sequence) agree with each other, so
a failure below points at the resume, not at the layouts. Each resume starts from a step-5 checkpoint of one of them
on another layout and must equal the uninterrupted run loss for loss at rtol 1e-5 over the 11 steps after it; the lr
the optimizer applied (logged from its param groups) must equal the schedule at every step. The schedule warms up
and decays, so an lr left at the freshly built scheduler's value after a conversion shows in the first update.

    interval checkpoint: 2 DP ZeRO-1 -> 1 rank ZeRO-1 and ZeRO-0;  1 rank ZeRO-0 -> 2 DP ZeRO-2;
                         2 stages -> 2 DP;  2 DP -> 2 stages;
                         2 sharing a sequence -> 1 rank ZeRO-0;  1 rank and 2 DP -> 2 sharing a sequence
    SIGUSR1 checkpoint:  the first five pairs, from a checkpoint saved on preemption mid-interval

With dropout (0.1 on embeddings, residuals, feed-forward and attention) the masks come from (seed, step, global
micro-batch, layer), not from a per-rank stream: the layouts agree with each other and a resume on another layout
is exact too.
"""
import re

import psutil
import pytest
import torch
from torch.testing import assert_close

from hgscale.config import load_config
from hgscale.core.schedule import lr_at
from tests.integration.train_helpers import TRAIN, Watched, command, demo_data, launch, metrics, tiny_config  # noqa: F401

pytestmark = pytest.mark.integration
STEPS, AT = 16, 5
TRAIN_KEYS = {"steps": STEPS, "lr": 3e-3, "warmup_steps": 3, "lr_schedule": "cosine", "min_lr": 1e-4,
              "log_interval": 1}
LAYOUTS = {  # name: (processes, parallel section, grad_accum_steps); every one has a global batch of 2 x accum x dp = 4
    "dp2_z1": (2, {"pipeline_stages": 1, "zero_stage": 1}, 1),
    "one_z1": (1, {"pipeline_stages": 1, "zero_stage": 1}, 2),
    "one_z0": (1, {"pipeline_stages": 1, "zero_stage": 0}, 2),
    "dp2_z2": (2, {"pipeline_stages": 1, "zero_stage": 2}, 1),
    "pp2": (2, {"pipeline_stages": 2, "zero_stage": 1}, 2),
    "sp2": (2, {"pipeline_stages": 1, "zero_stage": 1, "sequence_parallel": 2}, 2),
}


def layout_config(tmp, data, name: str, layout: str, dropout: float = 0.0, **checkpoint):
    _, parallel, accum = LAYOUTS[layout]
    return tiny_config(tmp, data, f"{name}.json", model={"dropout": dropout, "attn_dropout": dropout},
                       train={**TRAIN_KEYS, "grad_accum_steps": accum}, parallel=parallel,
                       checkpoint={"interval": AT, "keep_last": 5, **checkpoint})


def run(tmp, data, name: str, layout: str, dropout: float = 0.0, **checkpoint) -> dict[int, dict]:
    cfg = layout_config(tmp, data, name, layout, dropout, **checkpoint)
    launch(LAYOUTS[layout][0], TRAIN, ["--config", str(cfg)])
    return by_step(tmp / f"{name}_run")


def by_step(run_dir) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(run_dir) if "train/loss" in m}


def assert_losses_equal(have: dict, want: dict, steps) -> None:
    assert_close(torch.tensor([have[s]["train/loss"] for s in steps], dtype=torch.float64),
                 torch.tensor([want[s]["train/loss"] for s in steps], dtype=torch.float64), rtol=1e-5, atol=0)


def assert_lr_follows_schedule(tmp, name: str, have: dict) -> None:
    cfg = load_config(tmp / f"{name}.json")
    for step, m in have.items():
        assert m["train/lr"] == pytest.approx(lr_at(cfg, step - 1), rel=1e-12, abs=0), (name, step)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("resume_matrix")


@pytest.fixture(scope="module")
def straight(work, demo_data):  # noqa: F811
    """The uninterrupted runs, each with checkpoints every 5 steps."""
    return {layout: run(work, demo_data, f"u_{layout}", layout) for layout in LAYOUTS}


def test_uninterrupted_layouts_agree(work, straight):
    assert sorted(straight["dp2_z1"]) == list(range(1, STEPS + 1))
    for layout in LAYOUTS:  # every target of a resume below too, so a failure there points at the resume
        assert_losses_equal(straight[layout], straight["dp2_z1"], range(1, STEPS + 1))
    for layout, got in straight.items():
        assert_lr_follows_schedule(work, f"u_{layout}", got)


@pytest.mark.parametrize("source,target", [("dp2_z1", "one_z1"), ("dp2_z1", "one_z0"), ("one_z0", "dp2_z2"),
                                           ("pp2", "dp2_z1"), ("dp2_z1", "pp2"), ("sp2", "one_z0"), ("one_z1", "sp2"),
                                           ("dp2_z1", "sp2")])
def test_resume_from_an_interval_checkpoint_on_another_layout(work, demo_data, straight, source, target):  # noqa: F811
    name = f"r_{source}_to_{target}"
    resume = str(work / f"u_{source}_ckpt" / f"step{AT:08d}")
    got = run(work, demo_data, name, target, resume=resume)
    assert sorted(got) == list(range(AT + 1, STEPS + 1))
    assert_losses_equal(got, straight[source], range(AT + 1, STEPS + 1))
    assert_lr_follows_schedule(work, name, got)


def preempt_after(cfg, nprocs: int, step: int) -> int:
    """Run ``cfg``, send SIGUSR1 to its last rank once ``step`` is logged; returns the step it saved at."""
    run = Watched(command(nprocs, TRAIN, ["--config", str(cfg)]))
    run.wait_for_step(step, of=STEPS)
    ranks = [p for p in psutil.Process(run.proc.pid).children(recursive=True)
             if f"--local_rank={nprocs - 1}" in " ".join(p.cmdline())]
    (ranks[0] if nprocs > 1 else psutil.Process(run.proc.pid)).send_signal(psutil.signal.SIGUSR1)
    assert run.wait(120) == 0, run.tail()
    m = re.search(r"preempted at step (\d+); checkpoint saved", run.text)
    assert m, run.tail()
    return int(m.group(1))


@pytest.fixture(scope="module")
def preempted(work, demo_data):  # noqa: F811
    """Each source layout run until SIGUSR1 after step 3: {layout: (the preemption checkpoint, its step)}."""
    out = {}
    for layout in ("dp2_z1", "one_z0", "pp2"):
        cfg = layout_config(work, demo_data, f"p_{layout}", layout, interval=0)
        stopped = preempt_after(cfg, LAYOUTS[layout][0], 3)
        assert 3 <= stopped <= STEPS - 10, stopped  # at least 10 steps follow the resume
        out[layout] = (work / f"p_{layout}_ckpt" / f"step{stopped:08d}", stopped)
    return out


@pytest.mark.parametrize("source,target", [("dp2_z1", "one_z1"), ("dp2_z1", "one_z0"), ("one_z0", "dp2_z2"),
                                           ("pp2", "dp2_z1"), ("dp2_z1", "pp2")])
def test_resume_from_a_preemption_checkpoint_on_another_layout(work, demo_data, straight, preempted, source,  # noqa: F811
                                                               target):
    ckpt, stopped = preempted[source]
    name = f"pr_{source}_to_{target}"
    got = run(work, demo_data, name, target, resume=str(ckpt))
    assert sorted(got) == list(range(stopped + 1, STEPS + 1))
    assert_losses_equal(got, straight[source], range(stopped + 1, STEPS + 1))
    assert_lr_follows_schedule(work, name, got)
    first = by_step(work / f"p_{source}_run")  # the preempted run itself equals the uninterrupted one up to its stop
    assert_losses_equal(first, straight[source], range(1, stopped + 1))


def test_dropout_does_not_depend_on_the_layout(work, demo_data, straight):  # noqa: F811
    runs = {layout: run(work, demo_data, f"d_{layout}", layout, dropout=0.1) for layout in ("dp2_z1", "one_z0", "pp2")}
    for layout in ("one_z0", "pp2"):
        assert_losses_equal(runs[layout], runs["dp2_z1"], range(1, STEPS + 1))
    # dropout acted: every training loss (computed with the masks) differs from the dropout-free run's
    assert all(runs["dp2_z1"][s]["train/loss"] != straight["dp2_z1"][s]["train/loss"] for s in range(1, STEPS + 1))
    resume = str(work / "d_dp2_z1_ckpt" / f"step{AT:08d}")
    got = run(work, demo_data, "dr_dp2_z1_to_one_z1", "one_z1", dropout=0.1, resume=resume)
    assert_losses_equal(got, runs["dp2_z1"], range(AT + 1, STEPS + 1))
