"""NanGuard: a NaN/Inf loss outside fp16 stops the run (exit status NAN) and records train/diverged at its step, the
record a sweep reads to know the run diverged; fp16 leaves the step to the loss scaler and records nothing."""
import math

import pytest

from hgscale.core.status import NAN
from hgscale.training.callbacks import Halt, NanGuard, Services, StepInfo


def _guard(precision: str):
    said, recorded = [], []
    svc = Services(rank=0, say=lambda *a, **k: said.append(" ".join(map(str, a))),
                   record=lambda step, m: recorded.append((step, m)), save=lambda step: None, stop=lambda: None,
                   last_saved=lambda: 40)
    return NanGuard(svc, precision, "ckpts"), said, recorded


def _step(step: int, loss: float) -> StepInfo:
    return StepInfo(step=step, loss=loss, timings={}, tokens=8, lr=1e-3, last=100, layout=None)


@pytest.mark.parametrize("loss", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_stops_and_is_recorded_at_its_step(loss):
    guard, said, recorded = _guard("fp32")
    guard.after_step(_step(44, 2.5))
    assert recorded == [] and said == []
    with pytest.raises(Halt) as stop:
        guard.after_step(_step(45, loss))
    assert stop.value.status == NAN and recorded == [(45, {"train/diverged": 1.0})]
    assert "at step 45" in said[0] and "The last good checkpoint is step 40 in ckpts" in said[0]


def test_fp16_leaves_a_non_finite_step_to_the_loss_scaler():
    guard, said, recorded = _guard("fp16")
    guard.after_step(_step(45, math.nan))
    assert recorded == [] and said == []
