"""Regional compilation (hgscale/training/compile.py) and step profiles (hgscale/training/profiling.py),
without a trainer: fallbacks, messages, and a real trace of real steps."""
import json

import pytest
import torch
import torch.nn.functional as F

from hgscale.config import MODEL_SIZES, Config, ModelConfig
from hgscale.core.notation import parse_steps, steps_problem
from hgscale.models import HourglassLM
from hgscale.training.compile import backend_problem, compile_layers, guarded
from hgscale.training.profiling import StepProfiler


def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def tiny_model():
    torch.manual_seed(0)
    return HourglassLM(ModelConfig(**MODEL_SIZES["debug"])).train()


def test_no_working_backend_one_message_and_eager(capsys):
    m = tiny_model()
    said = []
    assert compile_layers(m.layers, say=said.append, backend=_failing_backend) == 0
    assert len(said) == 1 and "does not work here" in said[0] and "without compilation" in said[0]
    assert all(guarded(layer) is None for layer in m.layers)
    assert backend_problem("eager") is None  # dynamo's own backend works everywhere


def test_a_layer_that_cannot_compile_runs_eager_with_one_warning():
    """The probe passes (dynamo's eager backend), then one layer's compilation fails: it warns once, runs
    eager, and the output equals the uncompiled layers'."""
    import warnings
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]
    x = torch.randn(3, 4)
    want = layers[1](layers[0](x))
    assert compile_layers(layers, say=print, backend="eager") == 2
    bad = guarded(layers[1])
    bad.fn = torch.compile(bad.eager, backend=_failing_backend)
    with pytest.warns(UserWarning, match=r"layer 1 \(Linear\) could not be compiled"):
        out = layers[1](layers[0](x))
    assert not bad.compiled and guarded(layers[0]).compiled
    torch.testing.assert_close(out, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(layers[1](layers[0](x)), want)  # no second warning


def test_profile_steps_spec():
    assert parse_steps("20-22") == (20, 22) and parse_steps(" 5 ") == (5, 5)
    for bad in ("22-20", "0-3", "x", "3-", "1,2"):
        assert steps_problem(bad) and "train.profile_steps" in steps_problem(bad)[0]
    cfg = Config()
    cfg.data.url = "/tmp/x"
    cfg.train.profile_steps = "a-b"
    assert any("train.profile_steps = 'a-b'" in p for p in cfg.problems())


def test_profile_outside_the_run_says_so_and_records_nothing(tmp_path):
    said = []
    p = StepProfiler(tmp_path, "9-10", rank=0, steps=4, say=said.append)
    r = StepProfiler(tmp_path, "2-3", rank=0, steps=4, done=2, say=said.append)  # resumed past step 2
    for step in range(1, 5):
        for prof in (p, r):
            prof.on_step_start(step)
            assert prof.on_step_end(step) is None
    assert len(said) == 2 and "run ends at step 4" in said[0] and "resumes after step 2" in said[1]
    assert not (tmp_path / "profiles").exists() or not any((tmp_path / "profiles").iterdir())


def test_profile_of_real_steps(tmp_path):
    m = tiny_model()
    tokens = torch.randint(0, 256, (2, 17))
    said = []
    prof = StepProfiler(tmp_path, "2-3", rank=0, steps=4, say=said.append)
    traces = []
    for step in range(1, 5):
        prof.on_step_start(step)
        logits = m(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        traces.append(prof.on_step_end(step))
    assert traces[:2] == [None, None] and traces[3] is None
    trace = traces[2]
    assert trace == tmp_path / "profiles" / "steps_2-3_rank0.json"
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"aten::mm", "aten::addmm"} & names and "[memory]" in names  # ops and memory events
    assert "top 10 operators" in said[0] and "Self CPU" in said[1] and said[1].count("\n") >= 10
    prof.abandon()  # nothing running: a no-op
