"""The `dmq` command (pipelines.cli): each subcommand run as a user runs it (a fresh process) gives what the library
functions it stands for give in this process; bad input exits with code 2 and a one-line message naming the
argument; failures exit 1, interruptions 130, and leave no half-written folder."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import cli, fit_sampler, load_quantized, quantize_pipeline, use_sampler
from pipelines.digits_pipeline import DigitsPipeline
from pipelines.evaluation import save_grid
from tests.pipelines.tiny_pipelines import tiny_digits_pipeline

REPO = Path(__file__).resolve().parents[2]
CALIB = ["--labels", "0-3", "--calib-steps", "2", "--batch-size", "2"]


def dmq(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def tiny_pipeline():
    return tiny_digits_pipeline(8)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny float pipeline folder, and `dmq quantize` of it."""
    root = tmp_path_factory.mktemp("cli")
    tiny_pipeline().save_pretrained(root / "fp")
    proc = dmq("quantize", root / "fp", "--preset", "w8a8", *CALIB, "--out", root / "q", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"wrote {root / 'q'}: w8a8 on unet")
    return root


def probe(backbone):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 1, 8, 8, generator=g)
    with torch.no_grad():
        return backbone(x, torch.tensor([900, 100]), class_labels=torch.tensor([1, 10])).sample


def test_quantize_writes_what_the_library_makes(folders, one_thread):
    pipe = DigitsPipeline.from_pretrained(folders / "fp")
    pipe.set_progress_bar_config(disable=True)
    quantize_pipeline(pipe, "w8a8", call_kwargs=[{"class_labels": [0, 1]}, {"class_labels": [2, 3]}],
                      num_inference_steps=2, progress=False)
    saved = load_quantized(folders / "q")
    assert torch.equal(probe(saved.unet), probe(pipe.unet))
    assert not (folders / "q.partial").exists()


def test_info_reports_the_folder(folders):
    proc = dmq("info", folders / "q", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    model = load_quantized(folders / "q").unet
    quantized = [m for m in model.modules() if hasattr(m, "weight_spec")]
    q = info["quantized"]
    assert info["pipeline"] == "DigitsPipeline" and q["backbone"] == "unet" and q["preset"] == "w8a8"
    # one-token-per-sample layers (the time embedding's) go weight-only, group-wise; every other one per channel
    groups = sum(m.weight_spec.granularity == "group" and m.weight_spec.group_size == 32 for m in quantized)
    assert 0 < groups < len(quantized)
    assert q["layers"] == len(quantized)
    assert q["weights"] == {"int8 channel": len(quantized) - groups, "int8 group g32": groups}
    assert q["parameters"] == sum(p.numel() for p in tiny_pipeline().unet.parameters())
    assert q["calibration"]["calls"] == 2 and q["calibration"]["points"] == 2 * 2  # 2 calls x 2 steps
    assert info["disk_bytes"] == sum(f.stat().st_size for f in (folders / "q").rglob("*") if f.is_file())
    assert info["sampler"]["class"] == "DDPMScheduler"


def test_sample_writes_the_grid_of_the_library_samples(folders, tmp_path, one_thread):
    out = tmp_path / "grid.png"
    proc = dmq("sample", folders / "q", "--labels", "0-4", "--sampler", "deis", "--steps", "3", "--seed", "4",
               "--batch-size", "2", "--nrow", "5", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_quantized(folders / "q")
    pipe.set_progress_bar_config(disable=True)
    use_sampler(pipe, "deis")
    images = [pipe([label], num_inference_steps=3, generator=[torch.Generator().manual_seed(4 + label)],
                   output_type="pt").images[0] for label in range(5)]
    save_grid(images, tmp_path / "expected.png", nrow=5)
    with Image.open(out) as got, Image.open(tmp_path / "expected.png") as expected:
        assert got.size == (5 * 10 + 2, 10 + 2)  # five 8x8 tiles with 2-pixel padding
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_search_writes_the_searched_sampler_into_the_folder(folders, tmp_path, one_thread):
    folder = Path(shutil.copytree(folders / "q", tmp_path / "q"))
    proc = dmq("search", folder, "--steps", "3", "--labels", "1,2", "--num-latents", "4", "--iterations", "2",
               "--reference-steps", "8", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pipe = load_quantized(folders / "q")
    found = fit_sampler(pipe, [1, 2], 3, 2.0, num_latents=4, fine_steps=8, iters=2, progress=False)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    stored = config["dc_ratios"] or [1.0] * 3  # None: ratios reset after the table moved to another grid
    assert config["_class_name"] == "DCSolverScheduler" and stored == pytest.approx(found["ratios"])
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["samplers", "DCSolverScheduler"]
    reloaded = load_quantized(folder)  # the folder now loads with the searched sampler, schedule and ratios
    assert type(reloaded.scheduler) is type(pipe.scheduler)
    got, want = ({k: v for k, v in s.config.items() if not k.startswith("_")} for s in (reloaded.scheduler,
                                                                                         pipe.scheduler))
    assert got.keys() == want.keys() and want["searched_timesteps"]
    for key, value in want.items():
        if key == "fitted_coefficients" and value is not None:  # rows of the fitted table (nested)
            assert [pytest.approx(r) for r in value] == got[key]
            continue
        assert got[key] == (pytest.approx(value) if isinstance(value, (list, float)) else value), key


@pytest.mark.parametrize("flag, value, least", [("--reference-steps", "1", 2), ("--refine-iters", "-1", 0)])
def test_search_counts_are_refused_by_name(folders, flag, value, least):
    proc = dmq("search", folders / "q", flag, value)
    assert proc.returncode == 2
    assert f"argument {flag}: expected a whole number >= {least}, got '{value}'" in proc.stderr


def test_a_bad_preset_exits_2_with_one_line(folders, tmp_path):
    proc = dmq("quantize", folders / "fp", "--preset", "w3a3", *CALIB, "--out", tmp_path / "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("dmq quantize: error: unknown preset 'w3a3'")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["sample", "{tmp}/missing", "--labels", "0-9", "--out", "{tmp}/g.png"], "does not exist"),
    (["sample", "{q}", "--labels", "0-9", "--out", "{tmp}/g.txt"], "expected an image file name"),
    (["quantize", "{fp}", "--preset", "w8a8", *CALIB, "--out", "{q}"], "pass --overwrite"),
    (["quantize", "{fp}", "--preset", "w8a8", "--labels", "0-11", "--calib-steps", "1", "--out", "{tmp}/o"],
     "class_labels must lie in 0..9"),
    (["info", "{tmp}"], "no model_index.json"),
])
def test_bad_input_exits_2_naming_the_problem(folders, tmp_path, capsys, argv, message, one_thread):
    args = [a.format(tmp=tmp_path, q=folders / "q", fp=folders / "fp") for a in argv]
    assert cli.main([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dmq {args[0]}: error: ") and message in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("argv", [["quantize", "x", "--preset", "w8a8", "--labels", "9-3", "--out", "o"],
                                  ["quantize", "x", "--preset", "w8a8", "--out", "o"],
                                  ["sample", "x", "--labels", "1", "--steps", "0", "--out", "g.png"]])
def test_argument_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("error, code", [(RuntimeError("kernel exploded"), 1), (KeyboardInterrupt(), 130)])
def test_failures_and_interrupts_leave_no_folder(folders, tmp_path, monkeypatch, capsys, error, code, one_thread):
    def broken_save(pipe, directory):
        Path(directory).mkdir()
        (Path(directory) / "half.bin").write_bytes(b"x")
        raise error

    monkeypatch.setattr(cli, "save", broken_save)
    out = tmp_path / "o"
    assert cli.main(["quantize", str(folders / "fp"), "--preset", "w8a8", *CALIB, "--out", str(out),
                     "--no-progress"]) == code
    assert not out.exists() and not (tmp_path / "o.partial").exists()
    err = capsys.readouterr().err
    assert ("kernel exploded" in err and "--debug" in err) if code == 1 else "interrupted" in err


@pytest.mark.parametrize("command", ["quantize", "sample", "search", "eval", "info"])
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: dmq {command}" in out and f"examples:\n  dmq {command} " in out


def test_eval_help_is_the_scripts_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "fid", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: dmq eval fid") and "--num-samples" in out and "examples:" in out


def test_labels_parse():
    assert cli.parse_labels("0-4,9") == [0, 1, 2, 3, 4, 9]
    assert cli.parse_labels("7") == [7] and cli.parse_labels("1,3,5") == [1, 3, 5]


def test_console_script_is_declared():
    section = (REPO / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    module, _, func = re.search(r'^dmq = "([^"]+)"$', section, re.M).group(1).partition(":")
    assert (module, func) == ("pipelines.cli", "main") and callable(cli.main)
    assert "pipelines" not in (REPO / "dmq" / "__init__.py").read_text()  # dmq itself never imports pipelines
