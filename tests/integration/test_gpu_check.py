"""benchmarks/gpu_check.py at its CI size on CPU: every check runs and reports figures (on a GPU the same
script checks the CUDA paths; see BENCHMARKS.md)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu_at_tiny_size(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--steps", "3",
                        "--warmup", "1", "--compile-backend", "aot_eager", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ok"] and rep["device"] == "cpu" and rep["tiny"]
    checks = rep["checks"]
    assert set(checks) == {"attention", "dropout", "bf16_step", "compile", "oom", "train_hourglass", "train_vanilla"}
    cases = checks["attention"]["cases"]
    assert len(cases) == 2 * 3 * 3  # fp32/bf16 x self/down/up x blocked/sdpa/fused (no FlexAttention on CPU)
    assert all(c["ok"] for c in cases.values())
    assert max(c["max_rel_error"] for k, c in cases.items() if k.startswith("float32")) < 1e-4
    assert abs(checks["dropout"]["dropped_fraction"] - 0.2) < 0.02
    assert all(c["seconds"] > 0 and c["peak_mb"] > 0 for c in cases.values())
    assert checks["compile"]["layers_compiled"] == checks["compile"]["layers_compiled_after_steps"] == 7
    assert checks["compile"]["max_rel_diff"] < 1e-5
    assert "skipped" in checks["oom"]
    for name in ("train_hourglass", "train_vanilla"):
        t = checks[name]
        assert t["tokens_per_s"] > 0 and 0 < t["mfu"] < 1 and t["peak_memory_mb"] > 100
        assert t["last_loss"] < t["first_loss"]
    assert "all checks passed" in r.stdout and "MFU" in r.stdout
