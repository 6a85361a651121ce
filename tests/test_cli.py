"""Each command of the command line on a tiny setting."""

import json
import subprocess
import sys

import pytest

from torchkit.cli import main


@pytest.mark.dist
def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--workers",
                "2",
                "--steps",
                "6",
                "--methods",
                "none",
                "ef21",
                "econtrol",
                "powersgd",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert list(runs) == ["none", "ef21", "econtrol", "powersgd"]
    d = runs["none"]["params"]
    assert runs["none"]["bytes_sent_per_worker"] == 6 * 4 * d
    # ~1% TopK entries of 8 bytes per bucket (the recommended EF21 starts with a compressed round)
    assert runs["ef21"]["bytes_sent_per_worker"] < 0.3 * runs["none"]["bytes_sent_per_worker"]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 and r["final_loss"] > 0 for r in runs.values())
    assert (out / "loss_vs_bytes.png").stat().st_size > 10_000
    assert "| EF21 |" in (out / "table.md").read_text()
    assert "PowerSGD" in capsys.readouterr().out


def test_repro_ef21_tiny(tmp_path, shared_data, capsys):
    assert (
        main(["repro", "ef21", "--data", str(shared_data / "phishing.txt"), "--bits", "640", "--out", str(tmp_path)])
        == 0
    )
    res = json.loads((tmp_path / "ef21_phishing.json").read_text())
    assert res["k"] == 1 and res["steps"] == 21 and res["runs"]["ef21"]["multiplier"] == 16
    assert res["runs"]["ef21"]["grad_norm_sq"][-1] < res["runs"]["ef21"]["grad_norm_sq"][0]
    assert (tmp_path / "ef21_phishing.png").exists()
    assert "ef14" in capsys.readouterr().out


def test_repro_ef21w_tiny(tmp_path, shared_data):
    assert (
        main(
            [
                "repro",
                "ef21w",
                "--data",
                str(shared_data / "mushrooms.txt"),
                "--steps",
                "40",
                "--tols",
                "20",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    res = json.loads((tmp_path / "ef21w_mushrooms.json").read_text())
    assert res["gamma_ratio_predicted"] > 1 and res["L_var"] > 0
    old, new = (r["rounds_to"]["20.0"] for r in res["runs"].values())
    assert old is not None and new is not None and new <= old  # the larger step gets there no later


def test_bench_tiny(tmp_path, capsys):
    assert main(["bench", "--sizes", "2e4", "--ratios", "0.01", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert {r["op"] for r in res["rows"]} == {"ef14", "ef21", "econtrol", "topk", "accumulate"}
    assert all(r["ms_p50"] > 0 for r in res["rows"])
    assert "speedup" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["repro", "ef21", "--data", str(tmp_path / "missing.txt")]) == 2
    assert "data file not found" in capsys.readouterr().err
    assert main(["demo", "--workers", "1"]) == 2
    assert "workers must be >= 2" in capsys.readouterr().err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "torchkit", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "repro" in proc.stdout and "demo" in proc.stdout
