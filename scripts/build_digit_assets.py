"""Assemble the bundled digit pipelines in assets/, measure their full-precision quality, write their model cards.

    python scripts/build_digit_assets.py [--num-samples 1000] [--steps 50]

Run after scripts/train_digits.py has written assets/digits-unet/unet, assets/digits-dit/transformer and
assets/digits-classifier. For each diffusion model it
 1. saves a DigitsPipeline folder (model_index.json, the backbone, the DDPM training scheduler);
 2. stores fixed inputs and the backbone's outputs in reference.safetensors, so that tests can check that the
    bundled weights reload to the same function;
 3. samples num-samples digits (labels cycling 0..9, sample i seeded with i) with DPM-Solver++(2M) at 50 steps for
    guidance 1, 2 and 4, and reports class accuracy (bundled classifier) and FID against the 360 held-out digits
    in the classifier's 64-d feature space;
 4. writes grid.png (guidance 2, one row per class), quality.json and README.md (the model card).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DiTTransformer2DModel, DPMSolverMultistepScheduler, UNet2DModel
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from train_digits import make_scheduler  # noqa: E402

from pipelines import DigitClassifier, DigitsPipeline, load_digits  # noqa: E402
from pipelines.evaluation import DigitsFeatures, feature_stats, fid_from_stats  # noqa: E402

GUIDANCE = (1.0, 2.0, 4.0)
MODELS = {"unet": ("digits-unet", "unet", UNet2DModel), "dit": ("digits-dit", "transformer", DiTTransformer2DModel)}


def reference_io(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 16, 16, generator=g)
    t = torch.tensor([999, 500, 100, 0])
    labels = torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        out = model(x, t, class_labels=labels).sample
    return {"sample": x, "timestep": t, "class_labels": labels, "output": out.contiguous()}


def grid(images: torch.Tensor, rows: int, cols: int, scale: int = 4) -> Image.Image:
    imgs = images[: rows * cols, 0]
    h, w = imgs.shape[-2:]
    canvas = torch.ones(rows * (h + 1) + 1, cols * (w + 1) + 1)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        canvas[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = im
    arr = (canvas.numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)


@torch.no_grad()
def sample(pipe: DigitsPipeline, n: int, guidance: float, steps: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(n) % 10
    out = []
    for i in range(0, n, batch):
        gens = [torch.Generator().manual_seed(j) for j in range(i, min(n, i + batch))]
        out.append(pipe(labels[i: i + batch], guidance_scale=guidance, num_inference_steps=steps, generator=gens,
                        output_type="pt").images)
    return torch.cat(out), labels


def card(name: str, key: str, log: dict, quality: dict, real: dict) -> str:
    rows = "\n".join(
        f"| {float(g):g} | {q['class_accuracy'] * 100:.1f}% | {q['fid']:.2f} |"
        for g, q in quality["guidance"].items())
    training = (f"{log['steps_done']:,} steps, batch {log['batch_size']}, AdamW lr {log['lr']:g} (warm-up, cosine "
                f"decay), EMA {log['ema']}, bf16 autocast: {log['bf16_autocast']}")
    clf = f"{real['classifier_accuracy'] * 100:.1f}%"
    return f"""# {name}

A class-conditional pixel-space diffusion model ({log['model'].upper()}, `{key}`) for 16x16 digits, bundled with
dmq so that sampler and quantization quality can be measured offline. Load it with
`pipelines.DigitsPipeline.from_pretrained("assets/{name}")`.

| | |
|---|---|
| data | {log['data']} |
| conditioning | labels 0..9; null class 10 for classifier-free guidance, {log['p_uncond']:.0%} label dropout |
| noise schedule | {log['schedule']} (`scheduler/`) |
| parameters | {log['parameters']:,} |
| training | {training} |
| training time | {log['train_seconds'] / 60:.0f} min on {log['threads']} CPU thread(s), torch {log['torch']} |
| command | `{log['command']}` |
| final training loss | {log['final_loss']:.4f} |

## Full-precision quality

{quality['num_samples']} samples (labels cycling 0..9, sample i seeded with i), {quality['sampler']} with
{quality['steps']} steps. Class accuracy is the bundled classifier's (`assets/digits-classifier`, {clf} on the
held-out digits). FID is measured in that classifier's 64-d penultimate feature space against the
{real['num_test']} held-out digits; for scale, the {real['num_train']} training digits score
{real['fid_train_vs_test']:.2f} against the same reference.

| guidance | class accuracy | FID (digit features) |
|---:|---:|---:|
{rows}

`grid.png`: guidance 2, one row per class 0..9. Produced by `python scripts/build_digit_assets.py`
({quality['seconds']:.0f} s).
"""


def classifier_card(log: dict, real: dict) -> str:
    return f"""# digits-classifier

A small CNN for the 16x16 digits (`pipelines.DigitClassifier`): three convolutions, a 64-d penultimate layer and a
linear head. Its logits measure class fidelity of generated digits; its penultimate features are the FID feature
space for this data (`pipelines.evaluation.DigitsFeatures`).

| | |
|---|---|
| data | {log['data']} |
| augmentation | random shifts of up to one pixel, Gaussian noise of std 0.05, label smoothing 0.05 |
| parameters | {log['parameters']:,} |
| training | {log['steps_done']:,} steps, batch {log['batch_size']}, AdamW lr {log['lr']:g} (warm-up, cosine decay) |
| training time | {log['train_seconds']:.0f} s on {log['threads']} CPU thread(s), torch {log['torch']} |
| command | `{log['command']}` |
| held-out accuracy | {real['classifier_accuracy'] * 100:.1f}% of the {real['num_test']} held-out digits |
| FID, training vs held-out digits | {real['fid_train_vs_test']:.2f} (a floor for generated samples) |
"""


def drop_load_paths(folder: Path) -> None:
    """save_pretrained records where each component was loaded from (``_name_or_path``): a path on this machine,
    which the bundled folders must not carry."""
    for cfg in folder.glob("*/config.json"):
        data = json.loads(cfg.read_text())
        if data.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    assets = ROOT / "assets"

    clf = DigitClassifier.from_pretrained(assets / "digits-classifier").eval()
    xte, yte = load_digits("test")
    xtr, _ = load_digits("train")
    feats = DigitsFeatures(clf)
    with torch.no_grad():
        f_test, f_train = feats((xte + 1) / 2), feats((xtr + 1) / 2)
        clf_acc = (clf(xte).argmax(-1) == yte).float().mean().item()
        save_file({"images": xte[:8].contiguous(), "logits": clf(xte[:8]).contiguous()},
                  assets / "digits-classifier" / "reference.safetensors")
    mu_r, sig_r = feature_stats(f_test)
    real = {"num_test": len(xte), "num_train": len(xtr), "classifier_accuracy": clf_acc,
            "fid_train_vs_test": float(fid_from_stats(*feature_stats(f_train), mu_r, sig_r))}
    print(json.dumps(real))
    clf_log = json.loads((assets / "digits-classifier" / "train_log.json").read_text())
    (assets / "digits-classifier" / "README.md").write_text(classifier_card(clf_log, real))

    for key in args.models:
        name, attr, cls = MODELS[key]
        folder = assets / name
        model = cls.from_pretrained(folder / attr).eval()
        log = json.loads((folder / attr / "train_log.json").read_text())
        pipe = DigitsPipeline(scheduler=make_scheduler(), **{attr: model})
        pipe.save_pretrained(folder)  # also writes digits_pipeline.py, so plain diffusers can load the folder
        drop_load_paths(folder)
        save_file(reference_io(model), folder / "reference.safetensors")

        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        t0 = time.time()
        quality = {"num_samples": args.num_samples, "steps": args.steps, "sampler": "DPM-Solver++(2M)",
                   "guidance": {}}
        for g in GUIDANCE:
            images, labels = sample(pipe, args.num_samples, g, args.steps, args.batch_size)
            with torch.no_grad():
                acc = (clf(images * 2 - 1).argmax(-1) == labels).float().mean().item()
                fid = float(fid_from_stats(*feature_stats(feats(images)), mu_r, sig_r))
            quality["guidance"][f"{g:g}"] = {"class_accuracy": acc, "fid": fid}
            print(name, f"guidance {g:g}: accuracy {acc:.4f} FID {fid:.3f}", flush=True)
            if g == 2.0:
                order = torch.argsort(labels, stable=True)  # one row per class
                grid(images[order].reshape(10, -1, 1, 16, 16)[:, :10].reshape(-1, 1, 16, 16), 10, 10).save(
                    folder / "grid.png")
        quality["seconds"] = time.time() - t0
        quality["reference"] = real
        (folder / "quality.json").write_text(json.dumps(quality, indent=1))
        (folder / "README.md").write_text(card(name, attr, log, quality, real))


if __name__ == "__main__":
    main()
