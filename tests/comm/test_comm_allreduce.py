"""All-reduce correctness against numpy: every op, dtype and quantization, worlds 1 to 8,
bit-identical results on every peer, async handles, broadcast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from comm_harness import cluster, parallel

from cotrain.comm import Communicator
from cotrain.comm.quant import bf16_bits_to_fp32, fp32_to_bf16_bits

OPS = ["sum", "avg", "min", "max"]
QUANTS = ["none", "fp16", "bf16", "int8", "int8_minmax", "int4"]
# worst-case error of one quantize/dequantize of N(0, 1)-ish values, relative to max |value|
TOL = {"none": 1e-5, "fp16": 2e-3, "bf16": 1.6e-2, "int8": 0.08, "int8_minmax": 0.03, "int4": 0.25}


def inputs(world: int, numel: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(numel).astype(np.float32) for _ in range(world)]


def reference(xs: list[np.ndarray], op: str) -> np.ndarray:
    stack = np.stack([x.astype(np.float64) for x in xs])
    return {"sum": stack.sum(0), "avg": stack.mean(0), "min": stack.min(0), "max": stack.max(0)}[op]


def run_all(comms: list[Communicator], tensors: list, **kw) -> None:
    parallel([lambda c=c, t=t: c.all_reduce(t, **kw) for c, t in zip(comms, tensors, strict=True)])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_every_op_and_quantization_matches_numpy(world: int) -> None:
    numel = 3001  # not a multiple of anything: uneven blocks, streams and chunks
    with cluster(world, streams=2, chunk_kb=1) as (_, comms):
        assert sorted(c.rank for c in comms) == list(range(world))
        for op in OPS:
            for quant in QUANTS:
                xs = inputs(world, numel, seed=hash((world, op, quant)) % 2**32)
                ref = reference(xs, op)
                outs = [x.copy() for x in xs]
                run_all(comms, outs, op=op, quantization=quant)
                for o in outs[1:]:
                    assert np.array_equal(o, outs[0]), f"{op}/{quant}: peers differ"
                scale = np.abs(ref).max()
                # quantized partial sums pick up one rounding per hop
                tol = TOL[quant] * scale * (world if op in ("sum", "avg") else 1)
                err = np.abs(outs[0] - ref).max()
                assert err <= tol, f"{op}/{quant}: max error {err} > {tol}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_dtypes_keep_dtype_and_match(dtype: torch.dtype) -> None:
    world = 4
    with cluster(world) as (_, comms):
        xs = inputs(world, 10_000, seed=7)
        ts = [torch.from_numpy(x.copy()).to(dtype) for x in xs]
        ref = reference([t.float().numpy() for t in ts], "avg")
        run_all(comms, ts, op="avg")
        for t in ts:
            assert t.dtype == dtype and t.shape == (10_000,)
            assert torch.equal(t, ts[0])
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        assert np.abs(ts[0].float().numpy() - ref).max() <= tol * 4


@pytest.mark.timeout(60)
def test_numpy_fp16_and_multidimensional_shapes() -> None:
    with cluster(3) as (_, comms):
        xs = [np.full((4, 5, 6), i + 1, dtype=np.float16) for i in range(3)]
        run_all(comms, xs, op="sum")
        assert all(x.dtype == np.float16 and x.shape == (4, 5, 6) for x in xs)
        assert np.all(xs[0] == 6)


@pytest.mark.timeout(60)
def test_bf16_bit_conversion_rounds_to_nearest_even() -> None:
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.4e38], dtype=np.float32)
    back = bf16_bits_to_fp32(fp32_to_bf16_bits(x))
    expect = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    assert np.array_equal(back, expect)


@pytest.mark.timeout(60)
def test_async_all_reduce_and_broadcast() -> None:
    with cluster(4) as (_, comms):
        xs = [np.full(50_000, float(i), dtype=np.float32) for i in range(4)]
        handles = [c.all_reduce_async(x, op="sum") for c, x in zip(comms, xs, strict=True)]
        results = [h.wait(30) for h in handles]
        assert all(h.done() for h in handles)
        assert all(np.all(x == 6.0) for x in xs)
        assert results[0].world_size == 4 and results[0].bytes_sent > 0
        ys = [np.full(50_000, float(i), dtype=np.float32) for i in range(4)]
        run_all(comms, ys, op="sum", rollback=False)
        assert all(np.array_equal(y, xs[0]) for y in ys)
        for root in (0, 2):
            bs = [np.full(7777, float(c.rank * 10), dtype=np.float32) for c in comms]
            parallel(
                [
                    lambda c=c, b=b, r=root: c.broadcast(b, root=r)
                    for c, b in zip(comms, bs, strict=True)
                ]
            )
            assert all(np.all(b == root * 10) for b in bs)


@pytest.mark.timeout(60)
def test_bad_arguments_are_clear_errors() -> None:
    with cluster(1) as (_, comms):
        c = comms[0]
        with pytest.raises(ValueError, match="unknown op"):
            c.all_reduce(np.zeros(3, np.float32), op="mean")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="unknown quantization"):
            c.all_reduce(np.zeros(3, np.float32), quantization="int3")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="float32 or float16"):
            c.all_reduce(np.zeros(3, np.int64))
        with pytest.raises(ValueError, match="contiguous"):
            c.all_reduce(np.zeros((4, 4), np.float32)[:, 1])
        x = np.arange(5, dtype=np.float32)
        c.all_reduce(x, op="avg")  # world size 1 takes the same path
        assert np.array_equal(x, np.arange(5, dtype=np.float32))
