"""The benchmark's pure arithmetic: the GPU roofline model, core plans and capacity ratios."""
from __future__ import annotations

import pytest

from bench.gpu_model import GpuModel
from bench.metrics import capacity
from bench.procs import plan_cores

PARAMS = 1_500_000_000


def test_small_passes_are_memory_bound_large_ones_compute_bound():
    gpu = GpuModel()
    one, eight = gpu.forward_s(1, PARAMS), gpu.forward_s(8, PARAMS)
    assert one == pytest.approx(PARAMS * 2 / gpu.hbm_bytes_per_s + gpu.launch_s)
    assert eight == one  # 8 tokens still read the weights once: same time
    big = gpu.forward_s(4096, PARAMS)
    assert big == pytest.approx(2 * PARAMS * 4096 / gpu.peak_flops + gpu.launch_s)
    assert gpu.replay_s({"1": 3, "8": 1}, PARAMS) == pytest.approx(3 * one + eight)


def test_two_cores_put_the_verifier_on_core_0_and_devices_on_core_1():
    plan = plan_cores(4, [0, 1])
    assert plan.verifier == (0,) and plan.devices == (1,) and plan.dedicated
    wide = plan_cores(4, list(range(16)))
    assert len(wide.verifier) == 12 and wide.device_cores(5) == (wide.devices[1],)


def test_capacity_ratio_divides_plain_by_speculative_cost():
    def rec(mode, cpu, gpu):
        return {"pair": "d->t", "n_devices": 1, "mode": mode,
                "verifier_cpu_s_per_token": cpu, "modeled_gpu_s_per_token": gpu}

    (row,) = capacity([rec("plain", 0.06, 0.003), rec("speculative", 0.05, 0.002), rec("fixed", 0.07, 0.001)])
    assert row["capacity_ratio"] == pytest.approx(1.2)
    assert row["modeled_capacity_ratio"] == pytest.approx(3.0)


def test_replay_prices_recorded_passes_with_a_measured_curve():
    from bench.replay import replay
    from verifier_server.cost_curve import CostCurve

    flat = CostCurve({1: 0.02, 128: 0.02})
    bench = {"records": [
        {"pair": "d->t", "n_devices": 1, "mode": "plain", "committed_tokens": 64, "batch_sizes": {"1": 64}},
        {"pair": "d->t", "n_devices": 1, "mode": "fixed", "committed_tokens": 64, "batch_sizes": {"11": 16}},
    ]}
    (row,) = replay(bench, flat)
    assert row["measured_curve_capacity_ratio"] == pytest.approx(4.0)
