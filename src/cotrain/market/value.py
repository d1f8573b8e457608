"""What an offer is worth to a DiLoCo run: expected cost per million useful tokens.

Price per hour says little on its own: a cheap machine that computes slowly, or whose link makes
every synchronisation long, costs more per token trained. For a workload (model ``params``,
``inner_steps`` H between synchronisations, ``tokens_per_step`` per inner step, pseudo-gradients
sent at ``bytes_per_param``), an offer's throughput is

    compute  = measured GFLOP/s x GPUs x ``measured_efficiency`` (a host we benchmarked)
             or datasheet TFLOP/s x GPUs x ``mfu``               (``offers.TFLOPS``)
    t_step   = 6 x params x tokens_per_step / compute             (forward and backward)
    t_sync   = 2 x params x bytes_per_param x 8 / link bit rate   (ring all-reduce: out and in)
    useful tokens/s = H x tokens_per_step / (H x t_step + t_sync)

with the link's rate the offer's upload (else download) Mbit/s, or ``default_mbps`` when the
provider says nothing. An offer with neither a benchmark nor a datasheet figure has no estimate
and sorts last. These are estimates for ranking, the same model for every offer; the node's
real contribution is what the coordinator accepts (``cotrain market cost``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from cotrain.market.offers import TFLOPS, Offer


class Workload(BaseModel):
    model_config = ConfigDict(extra="forbid")
    params: float = Field(default=1e9, gt=0)
    inner_steps: int = Field(default=100, ge=1)
    tokens_per_step: int = Field(default=65_536, ge=1)
    bytes_per_param: float = Field(default=1.0, gt=0)
    """1: int8 pseudo-gradients (cotrain's default); 2: bf16; 4: fp32."""
    mfu: float = Field(default=0.4, gt=0, le=1)
    measured_efficiency: float = Field(default=0.6, gt=0, le=1)
    """Training reaches this fraction of a measured matmul rate."""
    default_mbps: float = Field(default=1000.0, gt=0)


def compute_flops(o: Offer, w: Workload) -> float | None:
    if o.measured_gflops:  # measured on one device: a GPU host has gpu_count of them
        return o.measured_gflops * 1e9 * max(o.gpu_count, 1) * w.measured_efficiency
    per = TFLOPS.get(o.gpu)
    if per is None or not o.gpu_count:
        return None
    return per * 1e12 * o.gpu_count * w.mfu


def useful_tokens_per_s(o: Offer, w: Workload) -> float | None:
    flops = compute_flops(o, w)
    if flops is None:
        return None
    t_step = 6 * w.params * w.tokens_per_step / flops
    mbps = o.net_up_mbps or o.net_down_mbps or w.default_mbps
    t_sync = 2 * w.params * w.bytes_per_param * 8 / (mbps * 1e6)
    return w.inner_steps * w.tokens_per_step / (w.inner_steps * t_step + t_sync)


def usd_per_mtoken(o: Offer, w: Workload) -> float | None:
    """Expected US dollars per million useful tokens (None: no estimate)."""
    tps = useful_tokens_per_s(o, w)
    if not tps:
        return None
    return o.usd_per_hour / (tps * 3600) * 1e6
