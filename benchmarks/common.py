"""What the benchmark scripts share: their --threads and --out flags, and the result file they leave.

    import common                       # benchmarks/ is the script's directory, first on sys.path
    ap = common.parser(__doc__)
    common.add_threads(ap)
    common.add_out(ap, "layer_times")   # --out, default benchmarks/results/layer_times.json
    args = ap.parse_args(argv)
    common.apply_threads(args.threads)
    ...
    common.write_result(args.out, {"command": common.command(__file__, argv), ...})
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser described by the first line of the script's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def add_threads(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")


def add_out(ap: argparse.ArgumentParser, name: str) -> None:
    """--out: where the result JSON goes, by default benchmarks/results/<name>.json (the file BENCHMARKS.md cites)."""
    ap.add_argument("--out", default=str(RESULTS / f"{name}.json"))


def apply_threads(threads: int) -> None:
    """--threads: torch's intra-op thread count; 0 keeps torch's own choice."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def command(script: str, argv: list[str] | None) -> str:
    """The command line of this run as the result file records it (``script``: the benchmark's __file__)."""
    return f"python benchmarks/{Path(script).name} " + " ".join(argv if argv is not None else sys.argv[1:])


def write_result(path: str | Path, result: dict, indent: int = 2) -> Path:
    """Write ``result`` as JSON (creating benchmarks/results/ if need be) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=indent))
    print(f"wrote {out}")
    return out


def live_tensor_peak(prof) -> int:
    """Peak bytes of live CPU tensors during a ``torch.profiler.profile(profile_memory=True)`` window: the maximum
    of the running sum of its allocation (+) and free (-) events in time order. What torch.cuda.max_memory_allocated
    counts on a GPU; resident memory would add the libraries and the pages glibc keeps after a free. Reads the
    profiler's kineto events (``prof.profiler.kineto_results``), the one place that holds them in time order."""
    import torch

    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak
