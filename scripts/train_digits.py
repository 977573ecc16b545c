"""Train the bundled digit models on scikit-learn's digits (16x16): a U-Net, a DiT, and the digit classifier.

    python scripts/train_digits.py unet --threads 1 --out assets/digits-unet
    python scripts/train_digits.py dit --threads 1 --out assets/digits-dit
    python scripts/train_digits.py classifier --steps 3000 --out assets/digits-classifier

The diffusion models are class-conditional epsilon predictors under the DDPM linear schedule (1,000 steps),
trained with classifier-free guidance: 10% of labels become the null class 10. The weights saved are an
exponential moving average. Each run writes a diffusers ``save_pretrained`` folder (safetensors) with
``train_log.json`` beside it, and saves along the way so an interrupted run keeps its last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.digits_classifier import DigitClassifier  # noqa: E402
from pipelines.digits_data import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, load_digits  # noqa: E402

P_UNCOND = 0.1


def make_unet() -> UNet2DModel:
    # three resolutions (16, 8, 4), self-attention at 8 and 4, skip concatenations, a learned class embedding
    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=16, num_class_embeds=NUM_CLASSES + 1,
    )


def make_dit() -> DiTTransformer2DModel:
    # adaLN-Zero, 2x2 patches: 64 tokens of width 96
    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=24, in_channels=1, out_channels=1, num_layers=4,
        sample_size=IMAGE_SIZE, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_type="ada_norm_zero",
        norm_elementwise_affine=False, attention_bias=True, activation_fn="gelu-approximate",
    )


def make_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")


def lr_at(step: int, steps: int, base: float, warmup: int = 200) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def save(model: torch.nn.Module, out: Path, log: dict) -> None:
    model.save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=1))


def train_diffusion(args: argparse.Namespace, log: dict) -> None:
    model = make_unet() if args.model == "unet" else make_dit()
    sched = make_scheduler()
    x0, y = load_digits("train")
    ac = sched.alphas_cumprod
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    log["parameters"] = sum(p.numel() for p in model.parameters())
    t0, losses = time.time(), []
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch_size,), generator=g)
        x, labels = x0[idx], y[idx]
        if args.model == "unet":  # the DiT's label embedder drops labels to the null class itself in train mode
            drop = torch.rand(args.batch_size, generator=g) < P_UNCOND
            labels = torch.where(drop, NULL_CLASS, labels)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=g)
        noise = torch.randn(x.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, t, class_labels=labels).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
            log["history"].append({"step": step + 1, "loss": recent, "seconds": time.time() - t0})
            log.update(steps_done=step + 1, train_seconds=time.time() - t0, final_loss=recent)
            print(f"step {step + 1}/{args.steps} loss {recent:.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save(ema, args.out, log)


def train_classifier(args: argparse.Namespace, log: dict) -> None:
    model = DigitClassifier()
    x0, y = load_digits("train")
    xt, yt = load_digits("test")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed)
    log["parameters"] = sum(p.numel() for p in model.parameters())
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch_size,), generator=g)
        x = x0[idx]
        # shifts of up to one pixel and mild noise, so that the features are not brittle on generated digits
        sh = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=sh, dims=(2, 3))
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        loss = F.cross_entropy(model(x), y[idx], label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            model.eval()
            with torch.no_grad():
                acc = (model(xt).argmax(-1) == yt).float().mean().item()
            model.train()
            log["history"].append({"step": step + 1, "loss": loss.item(), "test_accuracy": acc})
            log.update(steps_done=step + 1, train_seconds=time.time() - t0, test_accuracy=acc)
            print(f"step {step + 1} loss {loss.item():.4f} held-out accuracy {acc:.4f}", flush=True)
    save(model.eval(), args.out, log)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["unet", "dit", "classifier"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 (bf16 autocast is default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lr is None:
        args.lr = {"unet": 1e-3, "dit": 6e-4, "classifier": 2e-3}[args.model]
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = {
        "model": args.model, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "data": "scikit-learn digits, 16x16 bilinear, [-1, 1]; train split 1,437 images, 360 held out (seed 0)",
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "bf16_autocast": args.bf16,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "history": [],
    }
    if args.model == "classifier":
        train_classifier(args, log)
    else:
        log.update(ema=args.ema, p_uncond=P_UNCOND, schedule="DDPM linear, 1000 steps, epsilon prediction")
        train_diffusion(args, log)


if __name__ == "__main__":
    main()
