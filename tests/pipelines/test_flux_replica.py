"""pipelines.flux_replica: the demo's random-weight Flux pipeline builds from its config, is reproducible, samples
with dmq's samplers, and quantizes through quantize_pipeline."""

from __future__ import annotations

import pytest
import torch

from pipelines import quantize_pipeline, use_sampler
from pipelines.flux_replica import FluxReplicaConfig, flux_prompts, tiny_flux_pipeline

CFG = FluxReplicaConfig(image_size=16, layers=1, single_layers=1, heads=2, head_dim=8, axes_dims_rope=(2, 2, 4),
                        text_dim=16, pooled_dim=8)


def _run(pipe, steps: int = 3) -> torch.Tensor:
    p = flux_prompts(pipe, 2, seed=0)
    return pipe(prompt_embeds=torch.cat([x["prompt_embeds"] for x in p]),
                pooled_prompt_embeds=torch.cat([x["pooled_prompt_embeds"] for x in p]), height=CFG.image_size,
                width=CFG.image_size, num_inference_steps=steps,
                generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="pt").images


def test_same_seed_same_weights_and_images(one_thread):
    a, b = tiny_flux_pipeline(CFG), tiny_flux_pipeline(CFG)
    for name in ("transformer", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = tiny_flux_pipeline(FluxReplicaConfig(**{**CFG.__dict__, "seed": 1}))
    assert not torch.equal(other.transformer.proj_out.weight, a.transformer.proj_out.weight)
    x = _run(a)
    assert x.shape == (2, 3, CFG.image_size, CFG.image_size) and torch.isfinite(x).all()
    assert torch.equal(x, _run(b))
    assert a.transformer.config.num_layers == 1 and a.vae_scale_factor == 2


def test_prompts_have_the_widths_the_transformer_expects():
    pipe = tiny_flux_pipeline(CFG)
    p = flux_prompts(pipe, 3, seed=5, tokens=4)
    assert len(p) == 3 and p[0]["prompt_embeds"].shape == (1, 4, CFG.text_dim)
    assert p[0]["pooled_prompt_embeds"].shape == (1, CFG.pooled_dim) and p[0]["height"] == CFG.image_size
    assert torch.equal(p[1]["prompt_embeds"], flux_prompts(pipe, 1, seed=6, tokens=4)[0]["prompt_embeds"])
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        flux_prompts(pipe, 0)


@pytest.mark.parametrize("kw,match", [({"image_size": 18}, "multiple of 4"), ({"head_dim": 10}, "sum to head_dim"),
                                      ({"layers": 0}, "layers")])
def test_config_rejects_bad_sizes(kw, match):
    with pytest.raises(ValueError, match=match):
        FluxReplicaConfig(**{**CFG.__dict__, **kw})


def test_quantized_replica_samples_with_dmq_samplers(one_thread):
    pipe = tiny_flux_pipeline(CFG)
    fp = {}
    for sampler in ("deis", "dc-solver"):
        use_sampler(pipe, sampler)
        fp[sampler] = _run(pipe)
    quantize_pipeline(pipe, "w8a8", call_kwargs=flux_prompts(pipe, 2, seed=100), num_inference_steps=3,
                      progress=False)
    assert pipe.dmq_calibration.denoisers["transformer"]["timestep_range"] == [0.0, 1.0]  # Flux feeds t / 1000
    for sampler in ("deis", "dc-solver"):
        use_sampler(pipe, sampler)
        q = _run(pipe)
        err = (q - fp[sampler]).pow(2).sum() / fp[sampler].pow(2).sum()
        assert float(err) < 1e-2, sampler  # W8A8 of a tiny random model: SQNR > 20 dB on the decoded images
