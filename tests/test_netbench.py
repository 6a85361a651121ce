"""The shaped-network benchmark (``torchkit bench network``): its argument checks, its bookkeeping, and one
small run end to end (slow: it spawns torchrun in a namespace of its own when root)."""

import json
import math
import shutil
import subprocess

import pytest

from torchkit.apps import netbench
from torchkit.apps.cli import main


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--methods", "ef14@2"], "--methods"),
        (["--methods", "topk@0.01"], "--methods"),
        (["--methods", "powersgd"], "--methods"),
        (["--methods", "ef21@0.01:fp8"], "--methods"),
        (["--methods", "ef21@0.01:auto:bf16"], "--methods"),  # the wire first, then the exchange
        (["--methods", "ef21@0.01:int8:auto"], "--methods"),  # integer values: no shared support
        (["--rates", "fast"], "--rates"),
        (["--ranks", "1"], "--ranks"),
        (["--lr", "0.1", "-0.05"], "--lr"),
        (["--steps", "16"], "--steps must be at least 20"),  # shorter than the loss's smoothing: never reached
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(argv, named, capsys, tmp_path):
    assert main(["bench", "network", "--out", str(tmp_path), *argv]) == 2
    assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_every_default_method_is_known():
    extra = ("ef21@0.01:int8", "ef14@0.0156:int2", "olocal8@0.03", "econtrol@.001:bf16", "ef14@0.1:auto")
    for m in (*netbench.METHODS, *netbench.LOCAL_METHODS, *extra):
        assert netbench.check_method(m) == m
    assert netbench.split_method("ef14@0.01:bf16:auto") == ("ef14", 0.01, "bf16", "auto")
    assert netbench.split_method("ef21@.001") == ("ef21", 0.001, "fp32", "gather")


def test_reached_uses_the_smoothed_loss_and_the_elapsed_time():
    losses = [3.0] * 30 + [1.0] * 30
    row = {"losses": losses, "step_seconds": [0.5] * 60}
    got = netbench.reached(row, target=2.0, window=20)
    # the mean of the last 20 losses is <= 2 once 10 or more of them are 1.0: at step 40
    assert got == {"step": 40, "seconds": 20.0}
    assert netbench.reached(row, target=0.5, window=20) is None
    assert netbench.reached(row, target=None) is None


def test_utilisation_is_steady_state_compute_over_wall_time_with_the_drain():
    # a synchronisation every 2 steps (steps 2, 4, 6); the first step (start-up broadcast) is left out
    steps = [9.0, 3.0, 1.0, 2.0, 1.0, 1.5]
    assert netbench.utilisation(steps, every=2) == 5.0 / 8.5  # compute: the median step without a sync, 1.0
    assert netbench.utilisation(steps, every=2, tail_seconds=1.5) == 5.0 / 10.0  # a round still waited for
    assert math.isnan(netbench.utilisation([9.0, 3.0], every=2))


def test_the_utilisation_table_is_medians_over_seeds_per_local_configuration():
    def row(method, seed, sync_ms, reached):
        steps = [5.0] + [0.1 if (i + 1) % 2 else sync_ms / 1e3 for i in range(1, 9)]  # a sync every 2 steps
        return {"rate": "10mbit", "ranks": 2, "task": "char_lm", "method": method, "seed": seed, "lr": 0.1,
                "step_seconds": steps, "drain_seconds": 0.0, "reached": {"seconds": reached} if reached else None,
                "utilisation": netbench.utilisation(steps, 2), "utilisation_with_drain": 0.5,
                "diverged": False}  # fmt: skip

    rows = [row("local2@0.03", s, ms, 9.0) for s, ms in enumerate((300, 100, 500))] + [
        row("olocal2@0.03", 0, 100, None),
        {"rate": "10mbit", "ranks": 2, "task": "char_lm", "method": "ddp", "lr": 0.1, "utilisation": None},
        {**row("local2@0.03", 3, 100, None), "diverged": True},  # left out
        {**row("local2@0.03", 4, 100, None), "utilisation": math.nan},  # no step without a sync: left out
    ]
    text = netbench.utilisation_table(rows)
    (local,) = [line for line in text.splitlines() if "`local2@0.03`" in line]
    # eight steps after the first: 4 without a sync (100 ms), 4 with one; the median seed syncs in 300 ms
    assert "| 3 | 0.500 [0.333-1.000] | 0.500 [0.500-0.500] | 100 [100-100] | 300 [100-500] |" in local
    assert local.endswith("| 9.0 [9.0-9.0] |")
    assert "| `olocal2@0.03` | 1 | 1.000 |" in text and text.rstrip().endswith("| inf |") and "ddp" not in text


def test_summary_ratios_are_powersgd_time_over_each_family():
    def row(method, seconds):
        return {"rate": "100mbit", "ranks": 2, "task": "char_lm", "method": method,
                "reached": {"step": 1, "seconds": seconds} if seconds else None}  # fmt: skip

    rows = [row("ddp", 100.0), row("powersgd1", 12.0), row("powersgd4", 15.0), row("ef14@0.01", 8.0),
            row("ef14@0.01", 10.0), row("ef14@0.01", 9.0), row("ef21@0.01", None), row("local8@0.03", 6.0)]  # fmt: skip
    text = netbench.summary(rows)
    assert "PowerSGD powersgd1 12.0 s" in text and "EF ef14@0.01 9.0 s" in text  # the median of 3 seeds
    assert "PowerSGD/EF 1.33x" in text and "PowerSGD/local 2.00x" in text


@pytest.mark.slow
def test_small_run_end_to_end(tmp_path, capfd):
    out = tmp_path / "res"
    argv = ["bench", "network", "--rates", "1gbit", "--ranks", "2", "--tasks", "digits_cnn", "--steps", "30",
            "--methods", "ddp", "ef14@0.01:int8", "local8@0.03", "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "network runs: 100%" in capfd.readouterr().err  # tqdm's bar, with an ETA while it runs
    (path,) = out.glob("*/network.json")
    result = json.loads(path.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"ddp", "ef14@0.01:int8", "local8@0.03"} and not any("failed" in r for r in rows.values())
    assert result["targets"]["digits_cnn/n=2"] == pytest.approx(rows["ddp"]["target_set"])
    for r in rows.values():
        assert r["steps_run"] == 30 and len(r["losses"]) == 30 and r["wire_bytes_per_step"] > 0
    assert 0 < rows["local8@0.03"]["utilisation"] <= 1 and rows["ddp"]["utilisation"] is None
    # the compressed runs put fewer bytes on the loopback than the dense all-reduce
    assert rows["ef14@0.01:int8"]["wire_bytes_total"] < rows["ddp"]["wire_bytes_total"] / 3
    assert rows["local8@0.03"]["wire_bytes_total"] < rows["ef14@0.01:int8"]["wire_bytes_total"]
    assert (path.parent / "network.png").exists()
    if result["shaped"] and shutil.which("ip"):  # every namespace it made is gone
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert "tkbench" not in listed


def test_a_lucky_single_seed_does_not_beat_a_median_of_three_and_the_table_shows_the_spread():
    def row(method, seconds, seed=0):
        return {"rate": "100mbit", "ranks": 2, "task": "char_lm", "method": method, "seed": seed,
                "reached": {"step": 1, "seconds": seconds} if seconds else None}  # fmt: skip

    rows = [row("ddp", 100.0), row("local8@0.03", 5.0)]
    rows += [row("local32@0.03", t, s) for s, t in enumerate((6.0, 8.0, 7.0))]
    rows += [row("powersgd1", t, s) for s, t in enumerate((10.0, 12.0, 11.0))]
    rows += [row("ef14@0.01", t, s) for s, t in enumerate((9.0, None, 1.0))]  # one seed never reached it
    best = netbench.best_by_family(rows)[("100mbit", 2, "char_lm")]
    assert best["local"] == (7.0, "local32@0.03", [6.0, 7.0, 8.0])
    assert best["EF"] == (float("inf"), "-", [])
    text = netbench.table(rows)
    assert "| char_lm | 2 | 100mbit | `ddp` 100.0 s (1 seed) | `powersgd1` 11.0 s [10.0-12.0] (3 seeds) |" in text
    assert text.endswith("| not reached | `local32@0.03` 7.0 s [6.0-8.0] (3 seeds) | - | 0.64 |")
    assert "DDP bf16" not in text  # a column only where it ran
    with_bf16 = netbench.table([*rows, row("ddp_bf16", 60.0)])
    assert with_bf16.startswith("| task | ranks | link | DDP | DDP bf16 | PowerSGD |")
    assert "| `ddp` 100.0 s (1 seed) | `ddp_bf16` 60.0 s (1 seed) | `powersgd1`" in with_bf16
    # a family that did not run on a link is "not run" there, not "not reached"
    other = netbench.table([*rows, row("ddp_bf16", 60.0), {**row("powersgd1", 30.0), "rate": "100mbit/25ms"}])
    assert "| char_lm | 2 | 100mbit/25ms | not run | not run | `powersgd1` 30.0 s (1 seed) | not run |" in other


def test_step_table_is_the_median_over_seeds_against_ddp():
    rows = [{"rate": "unshaped", "ranks": 2, "task": "char_lm", "method": m, "step_ms_median": t}
            for m, t in [("ddp", 100.0), ("ddp", 120.0), ("ef14@0.01", 121.0), ("ef14@0.01", 99.0),
                         ("ef14@0.01", 130.0)]]  # fmt: skip
    rows.append({"rate": "1gbit", "ranks": 2, "task": "char_lm", "method": "ddp", "step_ms_median": 1e4})
    text = netbench.step_table(rows)
    assert "| char_lm | 2 | `ddp` | 110.0 [100.0-120.0] | 1.00 |" in text
    assert "| char_lm | 2 | `ef14@0.01` | 121.0 [99.0-130.0] | 1.10 |" in text


def test_results_folders_are_named_as_the_committed_ones():
    from torchkit._results import device_slug

    assert device_slug("AMD EPYC (2 threads)") == "amd-epyc-2-threads"
    assert device_slug("Intel(R) Xeon(R) Processor (2 threads)") == "intel-r-xeon-r-processor-2-threads"
    assert device_slug("NVIDIA H200") == "nvidia-h200"


def test_the_learning_rate_grid_names_configurations_and_screened_rates_need_as_many_seeds():
    """Every method at every learning rate is one configuration; a rate screened on one seed does not beat a
    median of three, and once it has three seeds it is compared like any other."""

    def row(method, lr, seconds, seed=0):
        return {"rate": "100mbit", "ranks": 2, "task": "char_lm", "method": method, "lr": lr, "seed": seed,
                "reached": {"step": 1, "seconds": seconds}}  # fmt: skip

    rows = [row("powersgd1", 0.1, t, s) for s, t in enumerate((10.0, 12.0, 11.0))]
    rows += [row("ef14@0.01", 0.1, t, s) for s, t in enumerate((9.0, 9.5, 8.0))]
    rows += [row("ef14@0.01", 0.2, 2.0), row("powersgd1", 0.2, 20.0)]  # the screen: one seed each
    best = netbench.best_by_family(rows)[("100mbit", 2, "char_lm")]
    assert best["EF"] == (9.0, "ef14@0.01 lr=0.1", [8.0, 9.0, 9.5])
    rows += [row("ef14@0.01", 0.2, t, s) for s, t in ((1, 7.0), (2, 3.0))]
    best = netbench.best_by_family(rows)[("100mbit", 2, "char_lm")]
    assert best["EF"] == (3.0, "ef14@0.01 lr=0.2", [2.0, 3.0, 7.0])
    assert best["PowerSGD"][1] == "powersgd1 lr=0.1"
    assert "`ef14@0.01 lr=0.2` 3.0 s [2.0-7.0] (3 seeds)" in netbench.table(rows)
    assert "ef14@0.01 lr=" not in netbench.table([r for r in rows if r["lr"] == 0.1])  # one rate: plain names


def test_merge_replaces_only_the_runs_named_including_their_learning_rate(tmp_path):
    from torchkit._results import device_slug

    name, where = netbench._result_dir(tmp_path)
    assert where.name == device_slug(name)
    where.mkdir(parents=True)
    rows = [{"method": "ef14@0.01", "rate": "1gbit", "ranks": 2, "task": "char_lm", "seed": 0, "lr": lr}
            for lr in (0.1, 0.2)]  # fmt: skip
    (where / "network.json").write_text(json.dumps({"targets": {"char_lm/n=2": 3.2}, "rows": rows}))
    kept, targets = netbench._load(tmp_path, {"ef14@0.01"}, {"1gbit"}, {2}, {"char_lm"}, {0}, {0.2})
    assert kept == rows[:1] and targets == {("char_lm", 2): 3.2}


def _bf16_ddp(rank, world):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(64, 8))
    model.register_comm_hook(None, netbench._bf16_hook)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(rank))
    local = torch.autograd.grad(model.module(x).square().sum(), model.module.weight)[0]
    model(x).square().sum().backward()
    return local, model.module.weight.grad


@pytest.mark.dist
def test_the_bf16_baseline_averages_in_bf16_on_gloo():
    """ddp_bf16 (PyTorch's bf16_compress_hook refuses Gloo): each rank's gradient cast to bf16 and halved, summed,
    cast back; against that computed here from each rank's own gradient."""
    import torch

    from tests.dist_utils import run_dist

    (g0, got0), (g1, got1) = run_dist(_bf16_ddp, 2)
    want = ((g0.to(torch.bfloat16) / 2) + (g1.to(torch.bfloat16) / 2)).float()
    assert torch.equal(got0, want) and torch.equal(got1, want)
    assert not torch.equal(want, (g0 + g1) / 2)  # the rounding is there: this is not the fp32 mean
