"""A roofline model of one forward pass on an A100-80GB: what the CPU measurements would mean on a GPU.

On a CPU a forward pass costs nearly in proportion to its tokens, so verifying drafts saves little
CPU time per committed token. On a GPU a small pass is bound by reading the weights once, whatever
the batch, so fewer (larger) passes per token is what matters. The model prices each of the
verifier's recorded passes (``batch_sizes`` from /v1/stats) with

    t(B) = max(weight_bytes / HBM bandwidth, 2 * params * B / peak FLOP/s) + launch overhead

and is a model, not a measurement: every figure derived from it is labelled so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GpuModel:
    name: str = "A100-80GB SXM (roofline model)"
    # NVIDIA A100 datasheet, 80 GB SXM: HBM2e bandwidth and dense bf16 tensor-core throughput.
    hbm_bytes_per_s: float = 2.039e12
    peak_flops: float = 312e12
    # Per forward pass, beyond the roofline: a 1.5B decoder issues a few hundred kernels (about 28
    # layers of ~12 each) at a few microseconds of launch and tail each, plus the host-side
    # scheduling, sampling and device-host synchronisation of a serving loop without CUDA graphs;
    # small-model decode steps measure in the 1-3 ms range in such servers.
    launch_s: float = 1.5e-3
    bytes_per_param: int = 2  # bf16 weights

    def forward_s(self, tokens: int, params: int) -> float:
        """Modeled seconds of one forward pass over ``tokens`` positions."""
        memory = params * self.bytes_per_param / self.hbm_bytes_per_s
        compute = 2 * params * tokens / self.peak_flops
        return max(memory, compute) + self.launch_s

    def replay_s(self, batch_sizes: dict[str, int], params: int) -> float:
        """Modeled seconds of a recorded pass histogram {"B": count}."""
        return sum(count * self.forward_s(int(b), params) for b, count in batch_sizes.items())

    def describe(self, params_by_target: dict[str, int]) -> dict:
        """The constants, and each target's weight bytes, for the JSON report."""
        return {
            **asdict(self),
            "formula": "t(B) = max(weight_bytes / hbm_bytes_per_s, 2 * params * B / peak_flops) + launch_s",
            "targets": {
                t: {"params": p, "weight_bytes": p * self.bytes_per_param}
                for t, p in params_by_target.items()
            },
        }
