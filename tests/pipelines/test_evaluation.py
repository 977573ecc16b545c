"""pipelines.evaluation and pipelines.distributed against closed forms and independent computations."""

import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from pipelines.clip_compat import import_clip
from pipelines.digits_classifier import DigitClassifier
from pipelines.digits_pipeline import DigitsPipeline
from pipelines.distributed import apply_quant_preset, gather_indexed, generate_samples, load_pipeline, set_sampler
from pipelines.evaluation import (
    DigitsFeatures,
    InceptionFeatures,
    add_reference,
    class_accuracy,
    class_predictions,
    clip_score,
    clip_scores,
    compute_fid,
    fid_from_stats,
    fid_stats,
    load_clip,
    make_fid,
    mse,
    psnr,
    save_stats,
)
from tests.pipelines.tiny_pipelines import tiny_digits_pipeline


class Flatten(torch.nn.Module):
    """Identity features: FID on these is the Fréchet distance of the samples themselves."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.reshape(len(x), -1).double()


def gaussian(n, mu, root, seed):
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.as_tensor(mu, dtype=torch.float64) + z @ root.T


def rotation(d, seed):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def random_spd(d, seed):
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = tiny_digits_pipeline(16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return DigitClassifier().eval()


# ---------------------------------------------------------------------------------------------------------- FID
def test_fid_from_stats_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 0.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 0.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((sd1 - sd2) ** 2)  # 0.25+4+4 + 4+2.25+0 = 14.5
    assert fid_from_stats(mu1, np.diag(sd1**2), mu2, np.diag(sd2**2)) == pytest.approx(expected, rel=1e-12)
    assert fid_from_stats(mu1, np.diag(sd1**2), mu1, np.diag(sd1**2)) == pytest.approx(0.0, abs=1e-12)


def test_fid_from_stats_matches_scipy_sqrtm_on_non_commuting_covariances():
    s1, s2 = random_spd(6, 1).numpy(), random_spd(6, 2).numpy()
    mu1, mu2 = np.arange(6.0), np.ones(6)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_from_stats_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="covariances"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_torchmetrics_fid_equals_frechet_distance_of_gaussians():
    d, n = 3, 20_000
    rot = rotation(d, 0)  # commuting but non-diagonal covariances: the population FID is known in closed form
    var1 = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    var2 = torch.tensor([0.25, 3.0, 1.0], dtype=torch.float64)
    mu1, mu2 = [0.0, 0.0, 0.0], [1.0, -0.5, 0.25]
    x1 = gaussian(n, mu1, rot * var1.sqrt(), seed=1)
    x2 = gaussian(n, mu2, rot * var2.sqrt(), seed=2)
    metric = make_fid(Flatten(d))
    for k in range(0, n, 4096):  # several updates, as in streaming use
        metric.update(x1[k:k + 4096], real=True)
        metric.update(x2[k:k + 4096], real=False)

    sample = fid_from_stats(x2.mean(0), np.cov(x2.numpy().T), x1.mean(0), np.cov(x1.numpy().T))
    fid = compute_fid(metric)
    assert fid == pytest.approx(sample, rel=1e-9)
    tm = metric.compute()  # torchmetrics' own eigvals-based formula on the same states
    assert tm.dtype == torch.float64 and float(tm) == pytest.approx(sample, rel=1e-9)

    population = sum((a - b) ** 2 for a, b in zip(mu1, mu2)) + float(((var1.sqrt() - var2.sqrt()) ** 2).sum())
    # 1.3125 + (1 - 0.5)^2 + (sqrt 2 - sqrt 3)^2 + (sqrt 0.5 - 1)^2
    assert population == pytest.approx(1.749307, abs=1e-6)
    # sampling error: the estimate's standard deviation is about 3.6 / sqrt(N) here (0.026 at N = 20k)
    assert abs(fid - population) < 14 / math.sqrt(n)

    stats = fid_stats(metric)
    torch.testing.assert_close(stats["real"][0], x1.mean(0), rtol=0, atol=1e-12)
    assert stats["fake"][2] == n


def test_fid_needs_two_samples_on_each_side():
    metric = make_fid(Flatten(2))
    metric.update(torch.randn(10, 2), real=True)
    metric.update(torch.randn(1, 2), real=False)
    with pytest.raises(ValueError, match="N=1 generated"):
        compute_fid(metric)


def test_make_fid_needs_num_features():
    with pytest.raises(ValueError, match="num_features"):
        make_fid(torch.nn.Identity())


def test_digits_features_and_reference_sources_agree(tmp_path, classifier):
    feats = DigitsFeatures(classifier)
    assert feats.num_features == 64
    x = torch.rand(5, 1, 16, 16)
    torch.testing.assert_close(feats(x), classifier.features(x * 2 - 1).double())
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        feats(torch.rand(5, 3, 16, 16))

    # a folder of PNGs, the same images' statistics as .npz, and the bundled split all feed the same real side
    from pipelines.digits_data import load_digits

    real = ((load_digits("test")[0][:40] + 1) / 2 * 255).round() / 255
    for i, im in enumerate(real):
        Image.fromarray((im[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path / f"{i:03d}.png")
    fake = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    fids = {}
    for name, ref in [("folder", str(tmp_path)), ("npz", str(tmp_path / "ref.npz"))]:
        metric = make_fid(DigitsFeatures(classifier))
        assert add_reference(metric, ref) == 40
        metric.update(fake, real=False)
        fids[name] = compute_fid(metric)
        if name == "folder":
            save_stats(tmp_path / "ref.npz", *fid_stats(metric)["real"])
    direct = make_fid(DigitsFeatures(classifier))
    direct.update(real, real=True)
    direct.update(fake, real=False)
    assert fids["folder"] == pytest.approx(compute_fid(direct), rel=1e-9)
    assert fids["npz"] == pytest.approx(fids["folder"], rel=1e-9)

    metric = make_fid(DigitsFeatures(classifier))
    assert add_reference(metric, "digits-test") == 360
    assert fid_stats(metric)["real"][2] == 360


def test_bad_references_fail_clearly(tmp_path, classifier):
    metric = make_fid(DigitsFeatures(classifier))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        add_reference(metric, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="holds no"):
        add_reference(metric, str(tmp_path))
    np.savez(tmp_path / "bad.npz", mean=np.zeros(64))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        add_reference(metric, str(tmp_path / "bad.npz"))


def test_missing_inception_weights_file_fails_clearly(tmp_path):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(FileNotFoundError, match="weights-inception.pth") as err:
        InceptionFeatures(weights_path=missing)
    assert "download it from https://" in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_names_the_package():
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        InceptionFeatures()


# ---------------------------------------------------------------------------------------------------- CLIP score
@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    CLIP = import_clip().model.CLIP
    torch.manual_seed(2)  # this seed gives both signs of cosine below, so the max(., 0) is exercised
    model = CLIP(embed_dim=32, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
                 context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=1)
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_clip_score_equals_manual_computation(tiny_clip_file):
    clip = import_clip()
    path, original = tiny_clip_file
    model, preprocess = load_clip(str(path))
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = [f"a photo of the digit {i}" for i in range(8)]

    # manual: uint8 rounding, CLIP normalisation (32x32 inputs need no resize or crop), cosine, clamp, mean
    u8 = (images * 255).round() / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        e_img = model.encode_image((u8 - mean) / std)
        e_txt = model.encode_text(clip.tokenize(prompts))
        cos = (e_img / e_img.norm(dim=-1, keepdim=True) * (e_txt / e_txt.norm(dim=-1, keepdim=True))).sum(-1)
        cos_orig = torch.nn.functional.cosine_similarity(original.encode_image((u8 - mean) / std),
                                                         original.encode_text(clip.tokenize(prompts)))
    assert (cos > 0).any() and (cos < 0).any()
    manual = 100 * torch.maximum(cos, torch.zeros_like(cos))

    per = clip_scores(images, prompts, model, preprocess, batch_size=3)
    torch.testing.assert_close(per, manual, rtol=1e-4, atol=1e-4)
    assert clip_score(images, prompts, model, preprocess) == pytest.approx(float(manual.mean()), rel=1e-4, abs=1e-4)
    # the file really held this model (clip's loader rounds the weights through fp16)
    torch.testing.assert_close(cos, cos_orig, rtol=0, atol=2e-2)


def test_clip_scores_check_inputs(tiny_clip_file):
    model, preprocess = load_clip(str(tiny_clip_file[0]))
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        clip_scores(torch.rand(3, 3, 32, 32), ["a", "b"], model, preprocess)


def test_missing_clip_file_fails_clearly(tmp_path):
    missing = str(tmp_path / "clip-missing.pt")
    with pytest.raises(FileNotFoundError, match="clip-missing.pt") as err:
        load_clip(missing)
    assert "ViT-B/32" in str(err.value)


# ------------------------------------------------------------------------------------------ PSNR, MSE, accuracy
def test_mse_and_psnr_of_constant_offsets():
    a = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    offsets = torch.tensor([0.1, 0.01, 0.2, 0.05], dtype=torch.float64)
    b = a + offsets.view(4, 1, 1, 1).float()
    expected_mse = offsets**2
    torch.testing.assert_close(mse(a, b, reduction="none"), expected_mse, rtol=1e-5, atol=0)
    assert float(mse(a, b)) == pytest.approx(float(expected_mse.mean()), rel=1e-5)
    expected_psnr = -20 * torch.log10(offsets)  # 20, 40, 13.98, 26.02 dB for data_range 1
    torch.testing.assert_close(psnr(a, b, reduction="none"), expected_psnr, rtol=1e-5, atol=0)
    assert float(psnr(a, b)) == pytest.approx(float(expected_psnr.mean()), rel=1e-5)
    assert float(psnr(2 * a, 2 * b, data_range=2.0)) == pytest.approx(float(expected_psnr.mean()), rel=1e-5)
    assert math.isinf(float(psnr(a, a)))


def test_mse_psnr_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        mse(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        mse(torch.zeros(2, 3), torch.zeros(2, 3), reduction="sum")
    with pytest.raises(ValueError, match="data_range"):
        psnr(torch.zeros(2, 3), torch.zeros(2, 3), data_range=0)


def test_class_accuracy_counts_agreements(classifier):
    images = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    preds = classifier(images * 2 - 1).argmax(-1)
    torch.testing.assert_close(class_predictions(images, classifier, batch_size=3), preds)
    labels = preds.clone()
    labels[:4] = (labels[:4] + 1) % 10  # four wrong
    assert class_accuracy(images, labels, classifier) == pytest.approx(0.6, abs=1e-12)
    with pytest.raises(ValueError, match="one label per image"):
        class_accuracy(images, labels[:3], classifier)


# ------------------------------------------------------------------------------------------- seeded generation
def test_generate_samples_is_per_sample_seeded(tiny_pipe):
    labels, seeds = [0, 3, 7, 1, 9], [10, 11, 12, 13, 14]
    kwargs = {"num_inference_steps": 2, "guidance_scale": 2.0, "progress": False}
    idx, batched = generate_samples(tiny_pipe, labels, seeds, batch_size=2, **kwargs)
    assert idx == [0, 1, 2, 3, 4] and batched.shape == (5, 1, 16, 16)
    _, whole = generate_samples(tiny_pipe, labels, seeds, batch_size=5, **kwargs)
    torch.testing.assert_close(batched, whole, rtol=0, atol=1e-5)
    single = tiny_pipe([labels[3]], generator=torch.Generator().manual_seed(seeds[3]), num_inference_steps=2,
                       output_type="pt").images
    torch.testing.assert_close(batched[3:4], single, rtol=0, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])
    with pytest.raises(ValueError, match="one seed per sample"):
        generate_samples(tiny_pipe, labels, seeds[:2], batch_size=2, **kwargs)


def test_gather_indexed_orders_by_index():
    assert gather_indexed([2, 0, 1], ["c", "a", "b"]) == ["a", "b", "c"]


def test_pipeline_setup_hooks(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    pipe = load_pipeline(tmp_path / "pipe")
    assert isinstance(pipe, DigitsPipeline)
    assert set_sampler(pipe, "DDIMScheduler") == "DDIMScheduler"
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert set_sampler(pipe, "dc-solver") == "dc-solver"
    assert type(pipe.scheduler).__name__ == "DCSolverScheduler" and pipe.scheduler.config.num_train_timesteps == 1000
    assert set_sampler(pipe, "DEIS") == "deis" and type(pipe.scheduler).__name__ == "DEISScheduler"
    with pytest.raises(ValueError, match="unknown scheduler 'Nope'"):
        set_sampler(pipe, "Nope")
    with pytest.raises(ValueError, match="unknown quantization preset 'w3a3'; available: none, w8a8"):
        apply_quant_preset(pipe, "w3a3")
    apply_quant_preset(pipe, "w8a8", call_kwargs=[{"class_labels": [1, 2]}], num_inference_steps=2,
                       guidance_scale=2.0, progress=False)
    assert pipe.dmq_calibration.points == 2 and pipe.dmq_calibration.config == "w8a8"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pipeline(tmp_path / "absent")


def test_feature_stats_are_the_sample_mean_and_unbiased_covariance():
    from pipelines.evaluation import feature_stats

    f = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    mu, cov = feature_stats(f)
    np.testing.assert_allclose(mu, [3.0, 4.0])
    # deviations (-2,-2), (0,2), (2,0): sums of products / (n - 1)
    np.testing.assert_allclose(cov, [[4.0, 2.0], [2.0, 4.0]])
