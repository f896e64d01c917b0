"""Regional compilation: torch.compile per layer, for `train.compile=true`.

Each layer of the flat layer list (hourglass.py) gets its own compiled forward, so whatever wraps the
layers from outside keeps working: pipeline stages slice the list, activation checkpointing wraps a
layer's forward, DeepSpeed wraps the whole module, and state-dict keys do not change.

    n = compile_layers(model.layers, say=print)   # compiled layer count; 0 when no backend works

Compilation is lazy (the first call of a layer traces it); a layer whose compilation fails runs eager
from then on, with one warning naming it. Before touching any layer, a probe compiles a two-op function:
without a working backend (no C++ compiler, no Triton) training goes on eager after one message.
"""
from __future__ import annotations

import warnings

import torch

BACKEND = "inductor"


def backend_problem(backend: str = BACKEND, device: torch.device | str = "cpu") -> str | None:
    """None if ``backend`` compiles and runs a tiny function on ``device``, else why not (one line). The
    device matters: inductor compiles C++ for CPU tensors and Triton for CUDA ones."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend=backend, dynamic=False)
        x = torch.linspace(0, 1, 8, device=device)
        if not torch.allclose(fn(x), torch.sin(x) * 2 + 1):
            return "the probe function computed a wrong result"
    except Exception as e:  # noqa: BLE001 - any failure means: no compiled training here
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    finally:
        torch._dynamo.reset()  # the probe's guards and cache entries are not the model's
    return None


class _Guarded:
    """A layer's forward: the compiled one until it fails once, then the eager one."""

    def __init__(self, name: str, eager, backend: str):
        self.name, self.eager = name, eager
        self.fn = torch.compile(eager, backend=backend)  # shapes per level: dynamic after a recompile
        self.compiled = True

    def __call__(self, *args, **kwargs):
        if not self.compiled:
            return self.eager(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a compiler failure: this layer runs eager from now on
            self.compiled, self.fn = False, self.eager
            warnings.warn(f"train.compile: layer {self.name} could not be compiled ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it runs eager",
                          stacklevel=2)
            return self.eager(*args, **kwargs)


def allow_retained_backward() -> None:
    """Let compiled layers run backward more than once per forward (retain_graph=True).

    DeepSpeed's pipeline engine runs a stage's backward once per floating-point output tensor, retaining
    the graph for all but the last (a Hourglass stage sends the residual stream, the skip and u/v). AOT
    autograd's donated buffers (saved tensors reused as backward scratch) refuse a retained graph, so
    they are switched off; it costs the backward a little memory. torch exposes this switch only as a
    private config, hence one place here (tests/integration/test_train_compile_profile.py runs it)."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False


def compile_layers(layers, say=print, backend: str = BACKEND, retained_backward: bool = False,
                   device: torch.device | str = "cpu") -> int:
    """Give each module of ``layers`` a guarded compiled forward; returns how many (0 without a backend).
    ``device``: where the layers will run (the probe compiles for it); ``retained_backward``: the caller
    runs backward with retain_graph=True (pipeline stages)."""
    problem = backend_problem(backend, device)
    if problem:
        say(f"train.compile=true, but torch.compile ({backend}) does not work here: {problem}. "
            f"Training goes on without compilation (install a C++ compiler on CPU, or Triton on GPU).")
        return 0
    if retained_backward:
        allow_retained_backward()
    n = 0
    for i, layer in enumerate(layers):
        if isinstance(layer, torch.nn.Module):
            layer.forward = _Guarded(f"{i} ({getattr(layer, 'kind', type(layer).__name__)})", layer.forward, backend)
            n += 1
    return n


def guarded(layer) -> _Guarded | None:
    """The guarded forward compile_layers put on ``layer`` (None if none): for tests and reports."""
    fwd = layer.__dict__.get("forward")
    return fwd if isinstance(fwd, _Guarded) else None


def still_compiled(layers) -> int:
    """How many of ``layers`` still run their compiled forward (none fell back to eager): for reports."""
    return sum(1 for layer in layers if (g := guarded(layer)) is not None and g.compiled)
