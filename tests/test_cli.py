"""Each command of the command line on a tiny setting."""

import argparse
import io
import json
import re
import subprocess
import sys

import pytest
import torch

import torchkit
from torchkit.apps import cli
from torchkit.apps.cli import _Formatter, _parser, main


@pytest.mark.dist
def test_demo_tiny(tmp_path, capfd):
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
    captured = capfd.readouterr()
    assert "PowerSGD" in captured.out
    # rank 0's progress is tqdm's, with the count, the elapsed time and the ETA
    # off a terminal: plain lines (the bar's start and end here), no carriage returns
    assert "EF21: 6/6 steps (100%)" in captured.err and "\r" not in captured.err, captured.err


def test_repro_ef21_tiny(tmp_path, shared_data, capsys):
    argv = ["repro", "ef21", "--data", str(shared_data / "phishing.txt"), "--preset", "phishing", "--bits", "640"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "ef21_phishing.json").read_text())
    assert res["k"] == 1 and res["steps"] == 21 and res["seeds"] == [0, 1, 2]
    ef21 = res["runs"]["ef21"]
    assert ef21["multiplier"] == 16 and [r["seed"] for r in ef21["per_seed"]] == [0, 1, 2]
    assert all(c[-1] < c[0] for c in ef21["grad_norm_sq"])
    finals = [r["final_grad_norm_sq"] for r in ef21["per_seed"]]
    assert len(set(finals)) == 3  # the seed changes x0
    spread = ef21["final_grad_norm_sq"]
    assert spread["min"] == min(finals) < spread["mean"] < spread["max"] == max(finals) and spread["count"] == 3
    assert (tmp_path / "ef21_phishing.png").exists()
    out = capsys.readouterr().out
    assert "ef14" in out and "mean [min, max] over seeds 0, 1, 2" in out


def test_repro_one_seed_reproduces_the_single_run(tmp_path, shared_data):
    from torchkit.apps.repro import repro_ef21

    data = shared_data / "phishing.txt"
    both = repro_ef21(data, preset="phishing", bits=320, seeds=[3, 5])
    alone = repro_ef21(data, preset="phishing", bits=320, seeds=[5])
    for label, run in alone["runs"].items():
        assert run["per_seed"][0] == both["runs"][label]["per_seed"][1]
        assert run["grad_norm_sq"][0] == both["runs"][label]["grad_norm_sq"][1]


def test_repro_ef21w_tiny(tmp_path, shared_data):
    data = str(shared_data / "mushrooms.txt")
    argv = ["repro", "ef21w", "--data", data, "--preset", "mushrooms", "--seeds", "0", "2", "--steps", "60"]
    assert main([*argv, "--tols", "20", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "ef21w_mushrooms.json").read_text())
    assert res["gamma_ratio_predicted"] > 1 and res["L_var"] > 0 and res["seeds"] == [0, 2]
    old, new = (r["per_seed"] for r in res["runs"].values())
    for a, b in zip(old, new):
        hit_old, hit_new = a["rounds_to"]["20.0"], b["rounds_to"]["20.0"]
        assert hit_old is not None and hit_new is not None and hit_new <= hit_old  # the larger step gets there first


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out == f"torchkit {torchkit.__version__}\n"


def _options(parser, path=("torchkit",)):
    """(command path, action) for every option of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, (*path, name))
        elif action.help == argparse.SUPPRESS:  # internal (the network benchmark's worker entry)
            continue
        elif action.option_strings and not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield path, action


def test_every_option_has_help_and_shows_its_default():
    options = list(_options(_parser()))
    assert len(options) > 30
    for path, action in options:
        where = f"{' '.join(path)} {action.option_strings[0]}"
        assert action.help and len(action.help) > 10, f"{where} has no help text"
        shown = _Formatter("x")._get_help_string(action)
        if action.default is not None and not isinstance(action.default, bool):
            assert "(default: " in shown, f"{where} does not show its default {action.default!r}"
        elif not isinstance(action.default, bool) and not action.required:
            assert "default" in shown, f"{where} does not say what happens when it is left out"


def _help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_repro_help_shows_only_the_papers_options(capsys):
    ef21, ef21w = _help(["repro", "ef21"], capsys), _help(["repro", "ef21w"], capsys)
    ef21w_only, ef21_only = (
        ("--steps", "--tols", "--multiplier ", "--max-scale"),
        ("--bits", "--tol ", "--ef21-multiplier"),
    )
    assert all(opt in ef21w for opt in ef21w_only) and not any(opt in ef21 for opt in ef21w_only)
    assert all(opt in ef21 for opt in ef21_only) and not any(opt in ef21w for opt in ef21_only)
    for text in (ef21, ef21w):
        assert (
            "--preset {a9a,mushrooms,phishing,w8a}" in text and "(default: 20)" in text and "(default: 0 1 2)" in text
        )
    assert "a9a        d = 123  Top-4, EF21 64x, EF14 64x, 200000 bits/n" in ef21
    assert "w8a        d = 300  Top-1, EF21 64x, EF14 32x, 200000 bits/n" in ef21
    assert "ef21" in _help(["repro"], capsys)


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("a9a", ["Top-4 on the whole vector (preset a9a)", "EF21 64x (preset a9a), EF14 64x (preset a9a)",
                 "200000 bits per worker (preset a9a) = 1563 rounds"]),
        ("w8a", ["Top-1 on the whole vector (preset w8a)", "EF21 64x (preset w8a), EF14 32x (preset w8a)",
                 "200000 bits per worker (preset w8a) = 6251 rounds"]),
        ("mushrooms", ["Top-2 on the whole vector (preset mushrooms)", "EF21 1024x (preset mushrooms)",
                       "200000 bits per worker (preset mushrooms) = 3126 rounds"]),
        ("phishing", ["Top-1 on the whole vector (preset phishing)", "EF21 16x (preset phishing)",
                      "20000 bits per worker (preset phishing) = 626 rounds"]),
    ],
)  # fmt: skip
def test_preset_settings_printed_without_data(preset, expected, tmp_path, capsys):
    missing = tmp_path / f"{preset}.txt"  # --dry-run does not read it
    assert main(["repro", "ef21", "--data", str(missing), "--preset", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"repro ef21, preset {preset}" in out and "seeds 0, 1, 2" in out
    assert all(line in out for line in expected), out
    assert main(["repro", "ef21", "--data", str(missing), "--preset", preset, "--k", "3", "--dry-run"]) == 0
    assert "Top-3 on the whole vector (given)" in capsys.readouterr().out
    assert main(["repro", "ef21w", "--data", str(missing), "--preset", preset, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Top-1 on the whole vector (preset" in out and "64x each method's theoretical step" in out


def test_settings_come_from_the_preset_not_the_file_name(tmp_path, shared_data, capsys):
    argv = ["repro", "ef21", "--data", str(shared_data / "mushrooms.txt"), "--bits", "64", "--seeds", "0"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert "no preset: generic settings" in capsys.readouterr().out
    res = json.loads((tmp_path / "ef21_mushrooms.json").read_text())
    assert res["k"] == 1 and res["runs"]["ef21"]["multiplier"] == 1 and res["settings"]["source"]["k"] == "default"
    wrong = ["repro", "ef21", "--data", str(shared_data / "phishing.txt"), "--preset", "mushrooms"]
    assert main(wrong) == 2
    assert "preset 'mushrooms' is the paper's setting for mushrooms (d = 112 features)" in capsys.readouterr().err


def test_progress_off_a_terminal_is_lines(tmp_path, shared_data, capsys, monkeypatch):
    monkeypatch.setattr(cli.progress, "LINE_INTERVAL_S", 0.0)  # a line per update, to see every line's shape
    argv = ["repro", "ef21", "--data", str(shared_data / "phishing.txt"), "--bits", "64", "--seeds", "0"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) > 5
    assert all(line.startswith("progress: ") and " rounds (" in line for line in lines)
    assert lines[-1].startswith("progress: 20/20 rounds (100%)")  # 5 runs x (3 steps + 1) gradient rounds
    assert main([*argv, "--out", str(tmp_path), "--progress", "off"]) == 0
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = cli._progress("auto", stream)(50)
    for _ in range(50):
        bar.update(1)
    bar.close()
    assert "\r" in stream.getvalue() and "50/50" in stream.getvalue()
    lines = io.StringIO()
    bar = cli._progress("lines", lines)(50)
    bar.update(50)
    bar.close()
    assert "\r" not in lines.getvalue() and lines.getvalue().endswith(
        "50/50 rounds (100%), 00:00 elapsed, 00:00 left\n"
    )
    # the demo's, the network benchmark's and the plan's bars are the same (they wrote tqdm's carriage returns
    # into a log every 10 s); the plan's total is set as the calibration finds it
    log = io.StringIO()
    with cli.progress.bar(0, "calibrating", "step", stream=log) as bar:
        bar.total = 8
        bar.update(8)
    assert "\r" not in log.getvalue() and log.getvalue().endswith(
        "calibrating: 8/8 steps (100%), 00:00 elapsed, 00:00 left\n"
    )


def test_bench_tiny(tmp_path, capsys):
    assert main(["bench", "--sizes", "2e4", "--ratios", "0.01", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert {r["op"] for r in res["rows"]} == {"ef14", "ef21", "econtrol", "topk", "accumulate"}
    assert all(r["ms_p50"] > 0 for r in res["rows"])
    assert "speedup" in capsys.readouterr().out


def test_cli_errors(tmp_path, capsys):
    assert main(["repro", "ef21", "--data", str(tmp_path / "missing.txt"), "--progress", "off"]) == 2
    assert "torchkit repro ef21: error: data file not found" in capsys.readouterr().err
    for bad, message in (
        (["--k", "0"], "argument --k: must be a positive int, got '0'"),
        (["--seeds", "-1"], "argument --seeds: must be a non-negative integer, got '-1'"),
        (["--preset", "covtype"], "argument --preset: invalid choice: 'covtype'"),
        (["--bits", "x"], "argument --bits: must be a positive float, got 'x'"),
        (["--steps", "5"], "unrecognized arguments: --steps 5"),  # an ef21w option
    ):
        with pytest.raises(SystemExit) as exc:
            main(["repro", "ef21", "--data", "x.txt", *bad])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert main(["demo", "--workers", "1"]) == 2
    assert "workers must be >= 2" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--steps", "0"], "argument --steps: must be a positive int, got '0'"),
        (["demo", "--lr", "-1"], "argument --lr: must be a positive float, got '-1'"),
        (["demo", "--ratio", "0"], "argument --ratio: must be a number in (0, 1], got '0'"),
        (["demo", "--batch", "x"], "argument --batch: must be a positive int, got 'x'"),
        (["bench", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["bench", "--dtypes", "float99"], "argument --dtypes: invalid choice: 'float99'"),
        (["bench", "--ratios", "0"], "argument --ratios: must be a number in (0, 1], got '0'"),
        (["bench", "--sizes", "1e-3"], "argument --sizes: must be a positive length such as 1e6, got '1e-3'"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    """What a new user typed (issue 28): one line naming the argument, exit status 2, no folder left behind."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "torchkit-demo").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--out", "afile"], "argument --out: afile: afile is a file, not a folder"),
        (["demo", "--out", "afile/sub"], "argument --out: afile/sub: afile is a file, not a folder"),
        (["bench", "--out", "afile/sub"], "argument --out: afile/sub: afile is a file, not a folder"),
        (["bench", "network", "--out", "afile"], "argument --out: afile: afile is a file, not a folder"),
        (["plan", "--out", "."], "argument --out: . is a folder, not a file"),
        (["plan", "--out", "afile/plan.json"], "argument --out: afile/plan.json: afile is a file, not a folder"),
    ],
)
def test_an_out_path_that_cannot_be_written_is_refused_before_the_run(argv, message, tmp_path, capsys, monkeypatch):
    """Refused when the arguments are read (one line, exit 2), not after a run whose results would then be lost."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the message of a build without CUDA")
def test_bench_on_cuda_without_a_gpu_says_so(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "--device cuda: this machine has no CUDA device" in capsys.readouterr().err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "torchkit", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "repro" in proc.stdout and "demo" in proc.stdout


def test_repro_settings_errors(tmp_path):
    from torchkit.apps import repro

    cases = [
        (dict(preset="covtype"), "preset must be one of ['a9a', 'mushrooms', 'phishing', 'w8a'] or None"),
        (dict(seeds=[]), "seeds must be a non-empty list of non-negative ints"),
        (dict(k=0), "k must be a positive int, got 0"),
        (dict(bits=-1.0), "bits must be a positive finite number, got -1.0"),
        (dict(multipliers={"ef21": 0}), "multipliers['ef21'] must be a positive finite number"),
        (dict(n_workers=0), "n_workers must be a positive int, got 0"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            repro.ef21_settings(**kw)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        repro.ef21w_settings(steps=0)
    with pytest.raises(ValueError, match="max_scale must be >= 1"):
        repro.ef21w_settings(max_scale=0.5)
    with pytest.raises(ValueError, match="multipliers has unknown runs"):
        repro.repro_ef21(tmp_path / "x.txt", multipliers={"ef22": 2.0})


def test_demo_table_gives_ef21sgdm_its_eta_and_every_line_its_own_style():
    from torchkit.apps.demo import format_table, line_styles

    run = dict(label="EF21-SGDM", final_loss=0.4, test_accuracy=0.7, dense_bytes_per_worker=100)
    run.update(bytes_sent_per_worker=2, backward_seconds=0.1, params=10, lr=1.0, eta=0.1)
    cfg = dict(workers=4, backend="gloo", steps=10, ratio=0.01, powersgd_rank=1, lr=None)
    assert "| EF21-SGDM | 1 (eta 0.1) |" in format_table({"config": cfg, "runs": {"ef21sgdm": run}})
    styles = [tuple(sorted(s.items())) for s in line_styles(6)]
    assert len(set(styles)) == 6
    for key in ("color", "linestyle", "marker"):  # and no two neighbours share any one of them
        assert all(a[key] != b[key] for a, b in zip(line_styles(6), line_styles(6)[1:]))


def test_bad_numbers_are_argument_errors_not_tracebacks(tmp_path, capsys):
    """``--sizes inf`` raised OverflowError with a traceback, and a ``--k`` above the data's features was refused
    as "alpha must be in (0, 1], got 50.0" (found by an audit)."""
    for size in ("inf", "1e400", "0", "2.5"):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--sizes", size])
        assert exc.value.code == 2 and "must be a positive length such as 1e6" in capsys.readouterr().err
    data = tmp_path / "tiny.libsvm"
    g = torch.Generator().manual_seed(0)
    rows = [f"{1 if i % 2 else -1} " + " ".join(f"{j + 1}:1" for j in range(20) if torch.rand(1, generator=g) < 0.3)
            for i in range(60)]  # fmt: skip
    data.write_text("\n".join(rows) + "\n")
    assert main(["repro", "ef21", "--data", str(data), "--k", "1000", "--workers", "4", "--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "k = 1000 is more than the data's 20 features" in err, err
