"""Plain diffusers loads the bundled pipelines: a fresh interpreter that imports nothing of ours gets, through
diffusers' custom-pipeline mechanism, a pipeline whose samples equal pipelines.DigitsPipeline's bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from pipelines import DigitsPipeline
from pipelines import digits_pipeline as source

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("digits-unet", "digits-dit")

PLAIN = """
import sys, torch
from diffusers import DiffusionPipeline
out = {}
for name in sys.argv[3:]:
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1] + "/" + name, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    out[name] = pipe([0, 5, 9], num_inference_steps=4, generator=gens, output_type="pt").images
    out[name + ":class"] = type(pipe).__module__ + "." + type(pipe).__name__
ours = sorted(m for m in sys.modules if m.split(".")[0] in ("pipelines", "dmq", "samplers"))
torch.save({"images": out, "ours": ours}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """One fresh interpreter loads both bundled folders with diffusers alone (module cache in a scratch folder)."""
    tmp = tmp_path_factory.mktemp("plain")
    (tmp / "assets").symlink_to(ROOT / "assets", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp / "modules"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(tmp / "assets"), str(tmp / "out.pt"), *MODELS], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp / "out.pt")


def test_fresh_interpreter_imports_nothing_of_ours(plain_run):
    assert plain_run["ours"] == []
    for name in MODELS:
        assert plain_run["images"][name + ":class"].endswith("digits_pipeline.DigitsPipeline")
        assert not plain_run["images"][name + ":class"].startswith("pipelines.")


@pytest.mark.parametrize("name", MODELS)
def test_plain_diffusers_samples_equal_ours(plain_run, name, one_thread):
    pipe = DigitsPipeline.from_pretrained(ROOT / "assets" / name)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    ours = pipe([0, 5, 9], num_inference_steps=4, generator=gens, output_type="pt").images
    assert torch.equal(plain_run["images"][name], ours)


@pytest.mark.parametrize("name", MODELS)
def test_bundled_code_is_the_library_module(name):
    """The folder's pipeline code is a copy of pipelines/digits_pipeline.py (saving rewrites it)."""
    assert (ROOT / "assets" / name / "digits_pipeline.py").read_bytes() == Path(source.__file__).read_bytes()
    index = json.loads((ROOT / "assets" / name / "model_index.json").read_text())
    assert index["_class_name"] == ["digits_pipeline", "DigitsPipeline"]


def test_our_class_loads_without_remote_code_and_saves_a_plain_loadable_folder(tmp_path):
    pipe = DigitsPipeline.from_pretrained(ROOT / "assets" / "digits-dit")
    assert type(pipe) is DigitsPipeline and pipe.num_classes == 10 and pipe.null_class == 10
    pipe.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "digits_pipeline.py").read_bytes() == Path(source.__file__).read_bytes()
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    assert index["_class_name"] == ["digits_pipeline", "DigitsPipeline"] and "_name_or_path" not in index
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "copy")
    assert type(DigitsPipeline.from_pretrained(tmp_path / "copy")) is DigitsPipeline
