"""Evaluation metrics: FID with a pluggable feature network, CLIP score, same-seed PSNR/MSE and digit class accuracy.

Images are float ``(N, C, H, W)`` in [0, 1] throughout (the ``"pt"`` output of the pipelines).

FID runs on torchmetrics' ``FrechetInceptionDistance``: its states are float64 sums (``dist_reduce_fx="sum"``), so
each process updates it with its own samples and :func:`compute_fid` reduces them exactly across ranks. The feature
modules here return float64, so the result is float64 too (torchmetrics casts it to the features' dtype) while the
network keeps its own dtype; ``set_dtype(torch.float64)`` on the metric also works but makes Inception slow on GPUs.
The final distance is :func:`fid_from_stats`, evaluated on the synchronised states.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import PartialState
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from pipelines.clip_compat import import_clip
from pipelines.digits_classifier import DigitClassifier
from pipelines.distributed import distributed_state, generate_samples, shard_indices

__all__ = [
    "DigitsFeatures", "InceptionFeatures", "add_reference", "check_clip_name", "class_accuracy", "class_predictions",
    "clip_score", "clip_scores", "compute_fid", "fid_from_stats", "fid_stats", "generate_samples", "load_clip",
    "make_fid", "mse", "psnr", "require_torch_fidelity", "save_stats", "set_reference_stats",
]

logger = logging.getLogger(__name__)

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
REDUCTIONS = ("mean", "none")


# ----------------------------------------------------------------------------------------------- feature networks
class DigitsFeatures(nn.Module):
    """The digit classifier's penultimate layer: ``(N, 1, 16, 16)`` in [0, 1] to float64 ``(N, 64)``."""

    in_channels = 1

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.config.num_features)
        self.image_size = int(classifier.config.image_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> DigitsFeatures:
        """Load the classifier from a ``save_pretrained`` folder (``assets/digits-classifier``)."""
        if not Path(path).is_dir():
            raise FileNotFoundError(f"digit classifier folder {str(path)!r} does not exist; train it with "
                                    "`python scripts/train_digits.py classifier --out assets/digits-classifier`")
        return cls(DigitClassifier.from_pretrained(str(path)))

    def train(self, mode: bool = True) -> DigitsFeatures:
        return super().train(False)  # a fixed feature network never leaves evaluation mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.in_channels, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != size:
            raise ValueError(f"digit features need images of shape (N, {', '.join(map(str, size))}), "
                             f"got {tuple(images.shape)}")
        p = next(self.classifier.parameters())
        return self.classifier.features(images.to(p.device, p.dtype) * 2 - 1).double()


def require_torch_fidelity() -> None:
    """``ImportError`` with the install command when torch-fidelity (needed by the FID Inception) is missing."""
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ImportError("the FID Inception network needs torch-fidelity: `pip install torch-fidelity` "
                          "(or `pip install torchmetrics[image]`); the digits features need nothing extra")


class InceptionFeatures(nn.Module):
    """The standard FID Inception-v3 (torch-fidelity's TF port, via torchmetrics): 2048 pool features, float64.

    Images in [0, 1] are rounded to uint8 (as when saving a PNG) and grayscale is repeated to RGB; the network resizes
    to 299x299 itself. ``weights_path`` is a local copy of the weights file; without it torchmetrics downloads it.
    """

    in_channels = 3
    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, antialias: bool = True):
        super().__init__()
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"Inception weights file {str(weights_path)!r} not found; download it from "
                                    f"{INCEPTION_WEIGHTS_URL} and pass its path (or pass no path to download it "
                                    "automatically)")
        require_torch_fidelity()
        from torchmetrics.image.fid import NoTrainInceptionV3

        path = None if weights_path is None else str(weights_path)
        try:
            self.net = NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path,
                                          antialias=antialias)
        except OSError as err:  # urllib's URLError is an OSError
            raise RuntimeError(f"could not download the Inception weights ({err}); download {INCEPTION_WEIGHTS_URL}"
                               " elsewhere and pass its path") from err

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        p = next(self.net.parameters())
        self.net._dtype = p.dtype  # the dtype NoTrainInceptionV3 casts its input to
        return self.net(x.to(p.device)).double()


# ---------------------------------------------------------------------------------------------------------- FID
def _as_f64(x: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float64).cpu()


def feature_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``(N, d)`` features in float64, the inputs of :func:`fid_from_stats`."""
    f = features.double().cpu().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def fid_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between two Gaussians, in float64.

    ``tr (S1 S2)^(1/2)`` is evaluated as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``S1^(1/2) S2 S1^(1/2)`` (same spectrum as ``S1 S2``), with round-off negatives clipped to zero.
    """
    mu1, mu2, s1, s2 = map(_as_f64, (mu1, mu2, sigma1, sigma2))
    d = mu1.numel()
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"need means of shape (d,) and covariances (d, d) for one d; got {tuple(mu1.shape)}, "
                         f"{tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root1 @ s2 @ root1
    tr_root = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_root)


def make_fid(feature: nn.Module, device: str | torch.device | None = None) -> FrechetInceptionDistance:
    """A torchmetrics FID on ``feature`` (which needs a ``num_features`` attribute); real statistics survive reset."""
    if not isinstance(getattr(feature, "num_features", None), int):
        raise ValueError(f"the feature module {type(feature).__name__} needs an int `num_features` attribute")
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=True)
    return metric.to(device) if device is not None else metric


def set_reference_stats(metric: FrechetInceptionDistance, mu: Any, sigma: Any, n: int) -> None:
    """Make ``(mu, sigma)`` of ``n`` samples the real-side statistics (on one rank only: states are summed)."""
    mu, sigma = _as_f64(mu), _as_f64(sigma)
    d = metric.real_features_sum.numel()
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(f"reference statistics must have shapes ({d},) and ({d}, {d}) for this feature network, "
                         f"got {tuple(mu.shape)} and {tuple(sigma.shape)}")
    if n < 2:
        raise ValueError(f"reference statistics need N >= 2 samples, got N={n}")
    dev = metric.real_features_sum.device
    metric.real_features_sum = (n * mu).to(dev)
    metric.real_features_cov_sum = ((n - 1) * sigma + n * torch.outer(mu, mu)).to(dev)
    metric.real_features_num_samples = torch.tensor(n, device=dev)


def _stats_from_states(total: torch.Tensor, cov_total: torch.Tensor, n: torch.Tensor) -> tuple:
    count = int(n)
    if count == 0:
        return None, None, 0
    mu = total.double().cpu() / count
    sigma = (cov_total.double().cpu() - count * torch.outer(mu, mu)) / max(count - 1, 1)
    return mu, sigma, count


def fid_stats(metric: FrechetInceptionDistance) -> dict[str, tuple]:
    """``{"real": (mu, sigma, n), "fake": (mu, sigma, n)}`` over all processes (a collective call under torchrun)."""
    with metric.sync_context():
        real = _stats_from_states(metric.real_features_sum, metric.real_features_cov_sum,
                                  metric.real_features_num_samples)
        fake = _stats_from_states(metric.fake_features_sum, metric.fake_features_cov_sum,
                                  metric.fake_features_num_samples)
    return {"real": real, "fake": fake}


def compute_fid(metric: FrechetInceptionDistance) -> float:
    """FID between everything every process fed as real and as fake; needs N >= 2 on each side."""
    stats = fid_stats(metric)
    n_fake, n_real = stats["fake"][2], stats["real"][2]
    if n_fake < 2 or n_real < 2:
        raise ValueError(f"FID needs N >= 2 samples on each side, got N={n_fake} generated and N={n_real} reference")
    return fid_from_stats(*stats["fake"][:2], *stats["real"][:2])


def save_stats(path: str | os.PathLike, mu: Any, sigma: Any, n: int) -> None:
    """Write reference statistics as an ``.npz`` with ``mu``, ``sigma`` and ``n``, as :func:`add_reference` reads."""
    np.savez(path, mu=_as_f64(mu).numpy(), sigma=_as_f64(sigma).numpy(), n=np.int64(n))


def _update_batched(metric: FrechetInceptionDistance, images: torch.Tensor, real: bool, batch_size: int) -> None:
    for k in range(0, len(images), batch_size):
        metric.update(images[k:k + batch_size], real=real)


def _load_images(paths: Sequence[Path], mode: str) -> list[torch.Tensor]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            arr = np.asarray(im.convert(mode), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(arr).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1))
    return out


def add_reference(
    metric: FrechetInceptionDistance, reference: str, batch_size: int = 256, state: PartialState | None = None
) -> int:
    """Feed the reference side of ``metric``; returns its size N. Collective: every process calls it.

    ``reference`` is ``"digits-test"`` (the 360 held-out digits), a folder of PNG/JPG images (each process takes a
    contiguous share), or an ``.npz`` with ``mu`` and ``sigma`` (and optionally ``n``; loaded on the main process).
    """
    state = state or distributed_state()
    feature = metric.inception
    if reference == "digits-test":
        from pipelines.digits_data import load_digits

        images = (load_digits("test")[0] + 1) / 2
        mine = shard_indices(len(images), state)
        _update_batched(metric, images[mine], True, batch_size)
        return len(images)
    path = Path(reference)
    if not path.exists():
        raise FileNotFoundError(f"reference {reference!r} does not exist; expected 'digits-test', a folder of "
                                "PNG/JPG images or an .npz file with mu and sigma")
    if path.is_file() and path.suffix == ".npz":
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{reference!r} must contain arrays 'mu' and 'sigma', found {sorted(data.files)}")
            mu, sigma, n = data["mu"], data["sigma"], int(data["n"]) if "n" in data else 2
        if state.is_main_process:
            set_reference_stats(metric, mu, sigma, n)
        return n
    if not path.is_dir():
        raise ValueError(f"reference {reference!r} is neither 'digits-test', a folder of images nor an .npz file")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"reference folder {reference!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    mode = "L" if getattr(feature, "in_channels", 3) == 1 else "RGB"
    mine = shard_indices(len(files), state)
    for k in range(0, len(mine), batch_size):
        images = _load_images([files[i] for i in mine[k:k + batch_size]], mode)
        if len({tuple(im.shape) for im in images}) == 1:
            metric.update(torch.stack(images), real=True)
        else:  # mixed sizes: one at a time (the Inception resizes each)
            for im in images:
                metric.update(im[None], real=True)
    return len(files)


# ---------------------------------------------------------------------------------------------------- CLIP score
def check_clip_name(name_or_path: str) -> str:
    """``name_or_path`` if it names a clip-anytorch model or an existing file; ``FileNotFoundError`` otherwise."""
    names = import_clip().available_models()
    if name_or_path not in names and not os.path.isfile(name_or_path):
        raise FileNotFoundError(f"CLIP model {name_or_path!r} is not a file and not a known model name; "
                                f"known names: {names}")
    return name_or_path


def load_clip(name_or_path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """``(model, preprocess)`` from clip-anytorch: a name in ``clip.available_models()`` (downloaded to
    ``~/.cache/clip`` if needed) or a local checkpoint (a TorchScript archive or a plain state dict).

    A local state dict is read with ``torch.load(weights_only=True)`` on every torch version (clip-anytorch's own
    loader unpickles arbitrary objects on torch < 2.6); a TorchScript archive is read by ``torch.jit.load``, which
    runs no pickled Python."""
    clip = import_clip()
    name_or_path = check_clip_name(name_or_path)
    if name_or_path in clip.available_models():
        with warnings.catch_warnings():  # clip.load probes every file with the deprecated torch.jit.load first
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
            model, preprocess = clip.load(name_or_path, device=device, jit=False)
        return model.eval(), preprocess
    model = clip.model.build_model(_clip_state_dict(name_or_path)).to(device)
    if str(device) == "cpu":
        model.float()  # as clip.load: build_model stores fp16 weights
    return model.eval(), clip.clip._transform(model.visual.input_resolution)


def _clip_state_dict(path: str) -> dict[str, torch.Tensor]:
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            torchscript = any(n.endswith("constants.pkl") for n in z.namelist())
        if torchscript:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
                return torch.jit.load(path, map_location="cpu").state_dict()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError, ...)
        raise ValueError(f"CLIP checkpoint {path!r} is not a state dict that torch.load(weights_only=True) "
                         f"accepts ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"CLIP checkpoint {path!r} holds a {type(state).__name__}, not a state dict")
    return state


def _to_pil(images: torch.Tensor | Sequence[Image.Image]) -> list[Image.Image]:
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must have shape (N, 1 or 3, H, W), got {tuple(images.shape)}")
        arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]
    return list(images)


@torch.no_grad()
def clip_scores(
    images: torch.Tensor | Sequence[Image.Image], prompts: Sequence[str], model: nn.Module, preprocess: Any,
    batch_size: int = 64,
) -> torch.Tensor:
    """Per-image CLIP score ``100 * max(cos(E_image, E_text), 0)``, float ``(N,)`` (prompts longer than the context
    are truncated)."""
    pil = _to_pil(images)
    if len(pil) != len(prompts):
        raise ValueError(f"got {len(pil)} images for {len(prompts)} prompts; need one prompt per image")
    if not pil:
        raise ValueError("no images to score")
    clip = import_clip()
    device = next(model.parameters()).device
    scores = []
    for k in range(0, len(pil), batch_size):
        x = torch.stack([preprocess(im.convert("RGB")) for im in pil[k:k + batch_size]]).to(device)
        tokens = clip.tokenize(list(prompts[k:k + batch_size]), truncate=True).to(device)
        e_img, e_txt = model.encode_image(x).float(), model.encode_text(tokens).float()
        scores.append(100 * F.cosine_similarity(e_img, e_txt, dim=-1).clamp(min=0).cpu())
    return torch.cat(scores)


def clip_score(
    images: torch.Tensor | Sequence[Image.Image], prompts: Sequence[str], model: nn.Module, preprocess: Any
) -> float:
    """Mean CLIP score over the images (as torchmetrics' ``CLIPScore``, on a clip-anytorch model)."""
    return float(clip_scores(images, prompts, model, preprocess).mean())


# ------------------------------------------------------------------------------------- same-seed fidelity, classes
def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return per_sample.mean() if reduction == "mean" else per_sample


def mse(a: torch.Tensor, b: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error per sample (float64 ``(N,)`` with ``reduction="none"``) or its mean over samples."""
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"images must have the same shape (N, ...), got {tuple(a.shape)} and {tuple(b.shape)}")
    per = (a.double() - b.double().to(a.device)).pow(2).reshape(a.shape[0], -1).mean(dim=1)
    return _reduce(per, reduction)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """PSNR in dB per sample, ``10 log10(data_range^2 / MSE)`` (``inf`` for identical samples), or its mean."""
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    per = 10 * torch.log10(data_range**2 / mse(a, b, reduction="none"))
    return _reduce(per, reduction)


@torch.no_grad()
def class_predictions(images: torch.Tensor, classifier: nn.Module, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes of images in [0, 1] (the classifier takes [-1, 1]), int64 ``(N,)`` on the CPU."""
    p = next(classifier.parameters())
    preds = [classifier(images[k:k + batch_size].to(p.device, p.dtype) * 2 - 1).argmax(dim=-1).cpu()
             for k in range(0, len(images), batch_size)]
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def class_accuracy(images: torch.Tensor, labels: Any, classifier: nn.Module, batch_size: int = 256) -> float:
    """Fraction of images the classifier assigns to their conditioning label."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(images) != len(labels) or len(labels) == 0:
        raise ValueError(f"need one label per image and at least one image, got {len(images)} images and "
                         f"{len(labels)} labels")
    return float((class_predictions(images, classifier, batch_size) == labels).double().mean())


def save_grid(images: Sequence[torch.Tensor], path: str | os.PathLike, nrow: int = 10) -> None:
    """Write ``images`` (each ``(C, H, W)`` in [0, 1], all of one size) to ``path`` as one grid, ``nrow`` a row."""
    from torchvision.utils import save_image

    if not images:
        raise ValueError("no images to write")
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) != 1:
        raise ValueError(f"images of different sizes {sorted(sizes)} cannot share a grid")
    save_image(torch.stack(list(images)), path, nrow=nrow)
