"""pipelines.eval_fid and pipelines.eval_clip (`dmq eval fid|clip`, scripts/eval_fid.py, scripts/eval_clip.py): one
process vs two, argument checks, the CLIP scoring path."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image

from pipelines import eval_clip, eval_fid
from pipelines.clip_compat import import_clip
from pipelines.digits_classifier import DigitClassifier
from pipelines.digits_pipeline import DigitsPipeline

REPO = Path(__file__).resolve().parents[2]



def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=8,
                       num_class_embeds=11)
    DigitsPipeline(scheduler=DDPMScheduler(num_train_timesteps=1000), unet=unet).save_pretrained(root / "pipe")
    torch.manual_seed(0)
    DigitClassifier().save_pretrained(root / "classifier")
    return root


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    CLIP = import_clip().model.CLIP
    torch.manual_seed(2)
    model = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return str(path)


# ------------------------------------------------------------------------------------------------------ eval_fid
def test_eval_fid_gives_the_same_numbers_on_one_and_two_processes(assets, tmp_path):
    # N = 10 in batches of 3: one process draws batches {0,1,2}, {3,4,5}, ...; two draw {0,1,2}, {3,4} and {5,6,7},
    # {8,9}. Per-sample seeds make the samples, hence FID and accuracy, independent of that split.
    # One process through `dmq eval fid`, two through the script under torchrun: one program, the same numbers.
    args = ["--classifier", str(assets / "classifier"), "--num-samples", "10", "--nfe", "2", "--batch-size", "3",
            "--seed", "5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, "-m", "pipelines.cli", "eval", "fid", str(assets / "pipe"), *args, "--out",
                          str(tmp_path / "one")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    two = subprocess.run([*launcher, "scripts/eval_fid.py", "--pipeline", str(assets / "pipe"), *args, "--out",
                          str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]

    r1 = json.loads((tmp_path / "one" / "results.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (r1["world_size"], r1["samples_per_rank"]) == (1, [10])
    assert (r2["world_size"], r2["samples_per_rank"]) == (2, [5, 5])
    assert "rank 0/2 generates 5 samples (indices 0..4)" in two.stderr
    assert "rank 1/2 generates 5 samples (indices 5..9)" in two.stderr
    assert r1["fid"] > 0 and r2["fid"] == pytest.approx(r1["fid"], rel=1e-6)
    assert r2["class_accuracy"] == r1["class_accuracy"]
    for key, value in [("num_samples", 10), ("nfe", 2), ("sampler", "DDPMScheduler"), ("preset", "none"),
                       ("feature_extractor", "digits"), ("reference", "digits-test"), ("reference_num_samples", 360),
                       ("seed", 5), ("guidance", 2.0)]:
        assert r1[key] == r2[key] == value, key
    with Image.open(tmp_path / "one" / "grid.png") as grid:
        assert grid.size == (10 * 18 + 2, 18 + 2)  # make_grid: ten 16x16 tiles, 2-pixel padding

    # the same numbers from the library, in this process
    from pipelines.distributed import generate_samples, load_pipeline
    from pipelines.evaluation import DigitsFeatures, add_reference, class_accuracy, compute_fid, make_fid

    pipe = load_pipeline(assets / "pipe")
    labels, seeds = [i % 10 for i in range(10)], [5 + i for i in range(10)]
    _, images = generate_samples(pipe, labels, seeds, batch_size=10, num_inference_steps=2, guidance_scale=2.0,
                                 progress=False)
    features = DigitsFeatures.from_pretrained(assets / "classifier")
    metric = make_fid(features)
    add_reference(metric, "digits-test")
    metric.update(images, real=False)
    assert compute_fid(metric) == pytest.approx(r1["fid"], rel=1e-6)
    assert class_accuracy(images, labels, features.classifier) == r1["class_accuracy"]


@pytest.mark.parametrize("extra, message", [
    (["--num-samples", "1"], "N=1"),
    (["--quant", "w3a3"], "unknown quantization preset 'w3a3'"),
    (["--quant", "w8a8", "--calib-samples", "0"], "--calib-samples must be >= 1"),
    (["--quant", "w8a8", "--calib-nfe", "0"], "--calib-nfe must be >= 1"),  # was silently replaced by --nfe
    (["--features", "inception", "--inception-weights", "/nonexistent/inception.pth"], "/nonexistent/inception.pth"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--scheduler", "Nope"], "unknown scheduler 'Nope'"),
    (["some/dir", "--pipeline", "other/dir"], "got the pipeline twice"),
    pytest.param(["--features", "inception"], "pip install torch-fidelity",
                 marks=pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None,
                                          reason="torch-fidelity is installed")),
])
def test_eval_fid_rejects_bad_arguments(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_fid.main(["--out", "/nonexistent/out", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_fid_reports_a_missing_classifier(assets, tmp_path):
    args = eval_fid.build_parser().parse_args(["--pipeline", str(assets / "pipe"), "--classifier",
                                               str(tmp_path / "no-classifier"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no-classifier.*train_digits.py classifier"):
        eval_fid.run(args)


def test_eval_fid_quantizes_with_a_preset(assets, tmp_path, one_thread):
    common = ["--pipeline", str(assets / "pipe"), "--classifier", str(assets / "classifier"), "--num-samples", "4",
              "--nfe", "2", "--batch-size", "2", "--calib-samples", "4", "--no-progress"]
    fp = eval_fid.run(eval_fid.build_parser().parse_args([*common, "--out", str(tmp_path / "fp")]))
    q = eval_fid.run(eval_fid.build_parser().parse_args([*common, "--quant", "w4a8", "--out", str(tmp_path / "q")]))
    assert q["preset"] == "w4a8" and fp["preset"] == "none"
    assert q["fid"] > 0 and q["fid"] != fp["fid"]  # the quantized backbone made other samples


# ----------------------------------------------------------------------------------------------------- eval_clip
@pytest.mark.parametrize("text", ["", "\n   \n\t\n"])
def test_read_prompts_rejects_files_without_prompts(text, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match="has no prompts"):
        eval_clip.read_prompts(path)


def test_read_prompts_keeps_nonblank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red cube\n\n  a blue sphere  \n")
    assert eval_clip.read_prompts(path) == ["a red cube", "a blue sphere"]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        eval_clip.read_prompts(tmp_path / "missing.txt")


def test_eval_clip_rejects_bad_arguments(tmp_path, tiny_clip, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    for extra, message in [(["--prompts", str(empty), "--clip", tiny_clip], "has no prompts"),
                           (["--prompts", str(prompts), "--clip", str(tmp_path / "nope.pt")], "nope.pt"),
                           (["--prompts", str(prompts), "--clip", tiny_clip, "--nfe", "0"], "--nfe must be >= 1"),
                           (["--prompts", str(prompts), "--clip", tiny_clip, "--calib-nfe", "0"],
                            "--calib-nfe must be >= 1")]:
        with pytest.raises(SystemExit) as exit_info:
            eval_clip.main(["--pipeline", str(tmp_path), *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*torch.jit.load:FutureWarning")
def test_score_images_equals_manual_clip_score(tiny_clip):
    clip = import_clip()
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = [f"a photo of the digit {i}" for i in range(8)]  # with these, cosines of both signs
    scores = eval_clip.score_images(images, prompts, tiny_clip)

    model, _ = clip.load(tiny_clip, device="cpu", jit=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        e_img = model.encode_image(((images * 255).round() / 255 - mean) / std)
        e_txt = model.encode_text(clip.tokenize(prompts))
    cos = torch.nn.functional.cosine_similarity(e_img, e_txt)
    assert (cos < 0).any() and (cos > 0).any()
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), rtol=1e-4, atol=1e-4)


class FakeTextToImage:
    """Stands in for a text-to-image pipeline: image i is uniform noise from its own generator."""

    scheduler = DDIMScheduler()

    def to(self, device):
        return self

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt, generator, num_inference_steps, guidance_scale, output_type):
        assert len(prompt) == len(generator) and output_type == "pt"
        return SimpleNamespace(images=torch.stack([torch.rand(3, 32, 32, generator=g) for g in generator]))


def test_eval_clip_run_scores_what_it_generates(tmp_path, tiny_clip, monkeypatch):
    prompts = ["a cat", "a dog", "a red car", "a house", "a tree"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts))
    monkeypatch.setattr(eval_clip, "load_pipeline", lambda path, allow_hub: FakeTextToImage())
    out = tmp_path / "out"
    assert eval_clip.main(["--pipeline", "fake", "--prompts", str(tmp_path / "prompts.txt"), "--clip", tiny_clip,
                           "--seed", "3", "--batch-size", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    images = torch.stack([torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3 + i)) for i in range(5)])
    expected = eval_clip.score_images(images, prompts, tiny_clip)
    assert results["num_prompts"] == 5 and results["world_size"] == 1
    assert results["scores"] == pytest.approx(expected.tolist(), abs=1e-5)
    assert results["clip_score"] == pytest.approx(float(expected.mean()), abs=1e-5)
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (5 * 34 + 2, 34 + 2)
