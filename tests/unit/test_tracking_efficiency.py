"""Peak FLOP/s table, CPU matmul peak, MFU arithmetic and the resumable efficiency meter."""
import pytest

from hgscale.tracking import (
    EfficiencyMeter,
    achieved_flops,
    gpu_peak_tflops,
    measure_cpu_peak,
    mfu,
    names,
    peak_flops,
    pipeline_bubble_fraction,
)


@pytest.mark.parametrize("device_name, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.0),          # PCIe before the generic H100 pattern
    ("NVIDIA H200", "bf16", 989.4),
    ("NVIDIA H200 NVL", "bf16", 835.0),           # the PCIe card: NVL before the generic H200
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
    ("NVIDIA A10", "bf16", 125.0),                # not mistaken for A100
    ("NVIDIA A10G", "bf16", 70.0),
    ("NVIDIA L40S", "fp16", 362.1),               # not mistaken for L40
    ("NVIDIA L40", "bf16", 181.0),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("Tesla V100-SXM2-32GB", "bf16", None),       # no bf16 on Volta: no figure rather than a wrong one
    ("torch.bfloat16 card from the future", "bf16", None),
])
def test_gpu_peak_table(device_name, dtype, tflops):
    assert gpu_peak_tflops(device_name, dtype) == tflops


def test_dtype_aliases_and_bad_dtype():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "torch.bfloat16") == 989.4
    with pytest.raises(ValueError, match="dtype 'int4'"):
        gpu_peak_tflops("NVIDIA H100", "int4")


def test_override_wins_and_cpu_is_measured():
    assert peak_flops("cpu", override_tflops=2.5) == 2.5e12
    measured = peak_flops("cpu", dtype="fp32")
    # A real measurement: at least 1 GFLOP/s and below 100 TFLOP/s on any CPU this runs on.
    assert 1e9 < measured < 1e14
    # cached: the same figure without a second measurement
    assert measure_cpu_peak("fp32", n=1024) == measured


def test_cpu_peak_small_matrix_is_plausible():
    small = measure_cpu_peak("fp32", n=256, min_seconds=0.05)
    assert 1e8 < small < 1e14


def test_mfu_arithmetic():
    # 6 * N FLOPs/token for N = 1e9 params, 1000 tokens/s over 2 devices of 1 TFLOP/s each = 3 TFLOP/s per device
    assert achieved_flops(6e9, 1000, 2) == pytest.approx(3e12)
    assert mfu(6e9, 1000, 2, 1e13) == pytest.approx(0.3)
    assert mfu(6e9, 1000, 2, None) is None


def test_pipeline_bubble():
    assert pipeline_bubble_fraction(1, 8) == 0.0
    assert pipeline_bubble_fraction(4, 8) == pytest.approx(3 / 11)


def test_efficiency_meter_accumulates_and_resumes():
    m = EfficiencyMeter(flops_per_token=100.0, n_devices=4, peak_flops_per_device=1000.0)
    out = m.update(tokens=400, seconds=2.0, samples=4)
    assert out[names.TOKENS_PER_S] == pytest.approx(200.0)
    assert out[names.SAMPLES_PER_S] == pytest.approx(2.0)
    assert out[names.FLOPS] == pytest.approx(40000.0)
    assert out[names.TFLOPS_PER_DEVICE] == pytest.approx(100.0 * 200.0 / 4 / 1e12)
    assert out[names.MFU] == pytest.approx(100.0 * 200.0 / 4 / 1000.0)
    state = m.state_dict()
    m2 = EfficiencyMeter(flops_per_token=100.0, n_devices=4)
    m2.load_state_dict(state)
    out2 = m2.update(tokens=100, seconds=1.0)
    assert out2[names.TOKENS] == 500.0
    assert out2[names.FLOPS] == pytest.approx(50000.0)
    assert out2[names.ELAPSED_S] == pytest.approx(3.0)
    assert names.MFU not in out2          # no peak known: no MFU rather than a made-up one


def test_cpu_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
    """A peak measured on busy cores reads low; the best measurement on this machine is the one used."""
    from hgscale.tracking import efficiency

    monkeypatch.setenv("HGSCALE_CACHE", str(tmp_path))
    assert efficiency._remember_peak("cpu|2|fp32", 100e9) == 100e9
    assert efficiency._remember_peak("cpu|2|fp32", 40e9) == 100e9      # busy now: the stored best wins
    assert efficiency._remember_peak("cpu|2|fp32", 150e9) == 150e9     # a better one replaces it
    assert efficiency._remember_peak("cpu|2|bf16", 10e9) == 10e9       # keys are separate
    import json
    assert json.loads((tmp_path / "cpu_peak.json").read_text()) == {"cpu|2|fp32": 150e9, "cpu|2|bf16": 10e9}


def test_loss_curves_share_one_unit():
    """The end-of-run plot puts training and validation on one axis: bits when both were logged in bits."""
    assert names.loss_curve_keys({"train/loss", "train/bpc", "val/bpc", "val/loss"}) == ("train/bpc", "val/bpc", "bpc")
    assert names.loss_curve_keys({"train/loss", "train/bpd", "val/bpd"}) == ("train/bpd", "val/bpd", "bpd")
    # another tool's run without a training bits metric: both curves in nats
    assert names.loss_curve_keys({"loss", "val/bpc", "val/loss"}) == ("loss", "val/loss", "loss (nats/token)")
    assert names.loss_curve_keys({"train/loss"}) == ("train/loss", None, "loss (nats/token)")
