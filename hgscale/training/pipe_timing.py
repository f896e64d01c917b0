"""How long a pipeline stage waits on its neighbours: the measured pipeline bubble.

DeepSpeed's PipelineEngine runs each step as a schedule of instructions; the send/receive instructions
block until the neighbouring stage is ready (and then move the tensors), so the time spent in them is
the time this stage is not computing because of the pipeline: the bubble, plus transfers. The engine
looks instructions up in ``_INSTRUCTION_MAP`` (an internal of DeepSpeed, touched here and nowhere else);
an instance copy of that table with the four communication entries timed changes nothing else.
"""
from __future__ import annotations

import time

COMM_INSTRUCTIONS = ("SendActivation", "RecvActivation", "SendGrad", "RecvGrad")


class CommTimer:
    """Seconds ``engine`` (a deepspeed PipelineEngine) spent in send/receive instructions since the last
    :meth:`take`."""

    def __init__(self, engine):
        from deepspeed.runtime.pipe import schedule

        self.seconds = 0.0
        table = dict(type(engine)._INSTRUCTION_MAP)
        for name in COMM_INSTRUCTIONS:
            cls = getattr(schedule, name)
            table[cls] = self._timed(table[cls])
        engine._INSTRUCTION_MAP = table  # the engine reads self._INSTRUCTION_MAP: the instance copy wins

    def _timed(self, fn):
        def timed(engine, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(engine, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    def take(self) -> float:
        s, self.seconds = self.seconds, 0.0
        return s
