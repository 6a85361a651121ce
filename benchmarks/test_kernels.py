"""pytest-benchmark suite (small sizes): ``pytest benchmarks --benchmark-enable``.

The script bench_kernels.py covers the large sizes and writes the committed results.
"""

import pytest
import torch

import torchkit.ops as ops

D = 1_000_000


@pytest.fixture(scope="module")
def data():
    torch.manual_seed(0)
    return torch.randn(D), torch.randn(D), torch.randn(D)


IMPLS = ["reference"] + (["cpp"] if ops.build_extension() else [])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["ef14", "ef21", "econtrol", "topk"])
def test_bench_op(benchmark, data, op, impl):
    g, e, h = (t.clone() for t in data)
    k = D // 100
    fn = {
        "ef14": lambda: ops.ef14_step_(g, e, k, impl=impl),
        "ef21": lambda: ops.ef21_step_(g, h, k, impl=impl),
        "econtrol": lambda: ops.econtrol_step_(g, e, h, k, 0.1, impl=impl),
        "topk": lambda: ops.topk(g, k, impl=impl),
    }[op]
    benchmark.extra_info.update(d=D, k=k)
    vals, idx = benchmark(fn)
    assert vals.numel() == k
