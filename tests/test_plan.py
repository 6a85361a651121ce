"""``torchkit plan`` (issue 25): the cost model's parts against values worked out here, its argument checks, and one
calibration end to end on 2 Gloo processes (the small CNN, a few steps)."""

import json
import math

import pytest
import torch

from torchkit.apps import cli
from torchkit.apps.plan import Link, exchange_of, fit_link, parse_method, plan, powersgd_bytes, predict, wire_bytes


def test_fit_link_recovers_latency_and_bandwidth():
    sizes = [1e3, 1e4, 1e5, 1e6, 1e7]
    link = fit_link(sizes, [2e-4 + s / 5e8 for s in sizes])
    assert link.latency_s == pytest.approx(2e-4, rel=1e-6) and link.bytes_per_s == pytest.approx(5e8, rel=1e-6)
    flat = fit_link([1e3, 1e6], [1e-3, 1e-3])  # no bandwidth visible at these sizes: a huge one, not a negative
    assert flat.bytes_per_s > 1e12 and flat.time(1e6) == pytest.approx(1e-3)
    through_zero = fit_link([1e3, 1e6], [0.5e-6, 1e-3])  # a negative intercept becomes a fit through the origin
    assert through_zero.latency_s == 0.0
    with pytest.raises(ValueError, match="two or more"):
        fit_link([1.0], [1.0])


def test_methods_parse_as_the_network_benchmark_names_them():
    assert parse_method("powersgd4") == {"kind": "powersgd", "rank": 4}
    want = {"kind": "ef", "method": "ef21", "ratio": 0.01, "wire": "int8", "exchange": "gather"}
    assert parse_method("ef21@0.01:int8") == want
    assert parse_method("ef14@0.1:auto") == {**want, "method": "ef14", "ratio": 0.1, "wire": "fp32", "exchange": "auto"}
    assert parse_method("local8@0.03") == {"kind": "local", "every": 8, "ratio": 0.03, "wire": "int8",
                                           "exchange": "gather"}  # fmt: skip
    assert parse_method("diloco16") == {"kind": "diloco", "every": 16}
    with pytest.raises(ValueError, match="--methods"):
        parse_method("topk")


def test_powersgd_bytes_follow_pytorchs_rule():
    # 100 x 50 at rank 4: 100*50 >= (150)*4*2, so P is 100x4 and Q 50x4; a vector and a 3 x 3 matrix stay dense
    p, q, dense = powersgd_bytes([[100, 50], [7], [3, 3]], 4)
    assert (p, q, dense) == (4 * 400, 4 * 200, 4 * (7 + 9))
    p, q, _ = powersgd_bytes([[8, 2, 3, 3]], 1)  # a conv weight: 8 x 18 as PyTorch views it
    assert (p, q) == (4 * 8, 4 * 18)


def _calibration(n=4):
    return {
        "d": 1000, "ranks": n, "buckets": 2, "shapes": [[40, 25]], "compute_s": 0.1,
        "hook_s": {"ef14@0.01": 0.004, "ef14@0.01:auto": 0.003, "powersgd1": 0.002},
        "compress_s": {"0.03:int8": 0.006},
        "decode_s_per_entry": 1e-6,
        "all_reduce": {"latency_s": 1e-3, "bytes_per_s": 1e6}, "all_gather": {"latency_s": 2e-3, "bytes_per_s": 5e5},
    }  # fmt: skip


def test_predictions_add_up_the_measured_parts():
    cal = _calibration()
    assert predict(cal, "ddp") == pytest.approx(0.1 + 2 * 1e-3 + 4000 / 1e6)  # two buckets' latencies
    assert predict(cal, "ddp_bf16") == pytest.approx(0.1 + 2 * 1e-3 + 2000 / 1e6)
    assert predict(cal, "diloco8") == pytest.approx(0.1 + (1e-3 + 4000 / 1e6) / 8)
    msg = wire_bytes(1000, parse_method("ef14@0.01"))
    assert msg == 10 * 8 + 8  # 10 fp32 values and int32 indices, and the float64 non-finite check
    want = 0.1 + 0.004 + 2 * 2e-3 + msg / 5e5 + 3 * 10 * 1e-6  # the hook, the gathers, 3 more messages of 10
    assert predict(cal, "ef14@0.01") == pytest.approx(want)
    p, q, dense = powersgd_bytes([[40, 25]], 1)
    assert predict(cal, "powersgd1") == pytest.approx(0.1 + 0.002 + 3 * 1e-3 + (p + q + dense) / 1e6)
    local = wire_bytes(1000, parse_method("local8@0.03"))
    want = 0.1 + (0.006 + 2e-3 + local / 5e5 + 4 * 30 * 1e-6) / 8  # 4 messages of 30 entries (int8 on the wire)
    assert predict(cal, "local8@0.03") == pytest.approx(want)
    out = plan(cal, ["ddp", "ef14@0.01"], 100, {"ef14@0.01": 1.5})
    assert out["recommended"] == "ddp"  # 1.5x the steps outweighs the shorter step
    assert math.isclose(out["rows"][1]["time_to_target_s"], 150 * predict(cal, "ef14@0.01"))
    assert Link(1.0, 2.0).time(4.0) == 3.0
    assert exchange_of(cal, "ef14@0.01") == "all-gather" and exchange_of(cal, "ddp_bf16") == "all-reduce"


def test_the_hooks_exchange_follows_the_librarys_byte_model_as_ranks_grow():
    """d = 1001 in 2 buckets of 501, k = 6 each at 1%: a rank's message is 6 fp32 values and 6 int32 indices (48
    bytes) and the float64 non-finite check (56), against 2004 bytes dense. The hook compresses while the dense
    payload is at least twice the exchange's (``min_compression_rate=2``): the all-gather's 56 n bytes up to n = 17
    (bf16 values: 6 x 6 bytes padded to 40, and the check: 48 n, up to n = 20); past it the hook sends dense, and
    with ``exchange="auto"`` takes a shared support: the leader's 6 indices and the 6 values summed in fp32."""
    cal = {**_calibration(n=17), "d": 1001}
    assert exchange_of(cal, "ef14@0.01") == exchange_of(cal, "ef14@0.01:auto") == "all-gather"
    cal = {**_calibration(n=18), "d": 1001}
    assert exchange_of(cal, "ef14@0.01") == "dense" and exchange_of(cal, "ef14@0.01:auto") == "shared support"
    assert exchange_of(cal, "ef14@0.01:bf16") == "all-gather"
    assert exchange_of({**cal, "ranks": 21}, "ef14@0.01:bf16") == "dense"
    assert predict(cal, "ef14@0.01") == pytest.approx(0.1 + 0.004 + 2 * 1e-3 + 4004 / 1e6)  # as DDP, and the hook
    with pytest.raises(ValueError, match="broadcast"):  # a shared support's indices need the broadcast's times
        predict(cal, "ef14@0.01:auto")
    # per bucket: the 6 indices broadcast (24 bytes) and the 6 values all-reduced (24 bytes)
    cal["broadcast"] = {"latency_s": 3e-4, "bytes_per_s": 4e6}
    want = 0.1 + 0.003 + 2 * 3e-4 + 48 / 4e6 + 2 * 1e-3 + 48 / 1e6
    assert predict(cal, "ef14@0.01:auto") == pytest.approx(want)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--ranks", "1"], "--ranks"),
        (["--methods", "ddp", "nope"], "--methods"),
        (["--steps-factor", "powersgd2=2"], "--steps-factor"),  # not among --methods
        (["--methods", "ddp", "--steps-factor", "ddp=-1"], "--steps-factor"),
        (["--rate", "fast"], "--rates"),
    ],
)
def test_bad_arguments_are_named(argv, match, capsys):
    assert cli.main(["plan", *argv]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.dist
def test_a_calibration_end_to_end_on_two_processes(tmp_path, capsys):
    out = tmp_path / "plan.json"
    argv = ["plan", "--task", "digits_cnn", "--ranks", "2", "--compute-steps", "3", "--methods", "ddp", "powersgd1",
            "ef14@0.01", "ef14@0.2:auto", "local4@0.03", "--steps", "50", "--steps-factor", "ef14@0.01=1.2",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "recommended:" in text and "compute per step" in text and "broadcast" in text
    result = json.loads(out.read_text())
    cal = result["calibration"]
    assert cal["ranks"] == 2 and cal["d"] == sum(p.numel() for p in _digits_model().parameters())
    assert cal["compute_s"] > 0 and set(cal["hook_s"]) == {"powersgd1", "ef14@0.01", "ef14@0.2:auto"}
    assert cal["all_reduce"]["bytes_per_s"] > 0 and len(cal["all_gather_sweep"]) >= 2
    assert cal["broadcast"]["bytes_per_s"] > 0  # timed because a method asks for exchange="auto"
    rows = {r["method"]: r for r in result["rows"]}
    # at 20%, 2 ranks: the all-gather 2 x 8 x 0.2 = 3.2 bytes per entry, the shared support 1.6, dense 4 (and rate 2)
    assert rows["ef14@0.01"]["exchange"] == "all-gather" and rows["ef14@0.2:auto"]["exchange"] == "shared support"
    assert rows["ef14@0.01"]["time_to_target_s"] == pytest.approx(60 * rows["ef14@0.01"]["step_s"])
    assert all(r["step_s"] == pytest.approx(predict(cal, m)) for m, r in rows.items())


def _digits_model():
    from torchkit.apps import tasks

    torch.manual_seed(0)
    return tasks.digits_cnn(n_workers=2).model(0)
