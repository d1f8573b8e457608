"""GPU tensors through the communicator: all-reduce and shared state on CUDA tensors (staged
through host memory and written back in place). Skipped where no CUDA device is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comm_harness import cluster, parallel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_tensors_are_reduced_in_place(dtype: torch.dtype) -> None:
    world = 3
    gen = torch.Generator().manual_seed(3)
    host = [torch.randn(20_001, generator=gen).to(dtype) for _ in range(world)]
    ref = torch.stack([h.double() for h in host]).sum(0)
    with cluster(world, streams=2, chunk_kb=8) as (_, comms):
        ts = [h.to("cuda") for h in host]
        ptrs = [t.data_ptr() for t in ts]
        parallel(
            [lambda c=c, t=t: c.all_reduce(t, op="sum") for c, t in zip(comms, ts, strict=True)]
        )
        for t, p in zip(ts, ptrs, strict=True):
            assert t.is_cuda and t.dtype == dtype and t.data_ptr() == p  # same storage
            assert torch.equal(t, ts[0])
        tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 8e-2}[dtype]
        err = (ts[0].double().cpu() - ref).abs().max().item()
        assert err <= tol * ref.abs().max().item()


@pytest.mark.timeout(120)
def test_cuda_shared_state_is_fetched_into_the_device_tensor() -> None:
    world = 3
    with cluster(world) as (_, comms):
        states = [
            {"w": torch.full((1000,), 1.5, device="cuda"), "step": torch.tensor([4]).cuda()}
            for _ in range(world)
        ]
        states[2]["w"].fill_(-7.0)  # the odd one out fetches the majority's values
        parallel(
            [
                lambda c=c, s=s: c.sync_shared_state(s, revision=0)
                for c, s in zip(comms, states, strict=True)
            ]
        )
        for s in states:
            assert s["w"].is_cuda
            np.testing.assert_array_equal(s["w"].cpu().numpy(), np.full(1000, 1.5, np.float32))
            assert int(s["step"].item()) == 4
