"""Regression tests of issue 15 for quantize_pipeline: argument checks at the door, rollback of text encoders with
the original error unmasked, and failing fast on non-finite backbone outputs."""

import pickle

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dmq
from pipelines import quantize_pipeline
from pipelines.evaluation import load_clip
from pipelines.quantize import restore_pipeline
from tests.dmq.test_validation import ANY
from tests.pipelines.tiny_pipelines import build, generate


def _state(pipe):
    """Everything a failed quantize_pipeline must leave as it was: module types, tensors, hooks."""
    out = {}
    for attr in ("unet", "text_encoder"):
        mod = getattr(pipe, attr)
        out[attr] = ([(n, type(m)) for n, m in mod.named_modules()],
                     {k: v.clone() for k, v in mod.state_dict().items()},
                     sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mod.modules()))
    return out


def _assert_same(a, b):
    for attr in a:
        assert a[attr][0] == b[attr][0] and a[attr][2] == b[attr][2]
        assert a[attr][1].keys() == b[attr][1].keys()
        assert all(torch.equal(a[attr][1][k], b[attr][1][k]) for k in a[attr][1])


@pytest.fixture(scope="module")
def sd():
    rep = build("sd")
    return rep, _state(rep.pipe), generate(rep, 2)


def test_failed_calibration_rolls_back_packed_text_encoders_and_shows_the_real_error(sd):
    """Defect 2: text_encoders="w8a16" with pack=True; the calibration fails: the real error reaches the user and
    the text encoder is back in full precision, bit for bit."""
    rep, before, image = sd
    # embeddings of the wrong width: fails inside the U-Net's cross-attention
    bad = [{"prompt_embeds": torch.randn(1, 6, 7), "negative_prompt_embeds": torch.randn(1, 6, 7)}]
    with pytest.raises(RuntimeError) as err:
        quantize_pipeline(rep.pipe, "w8a8", call_kwargs=bad, num_inference_steps=2, text_encoders="w8a16",
                          guidance_scale=rep.guidance_scale, progress=False)
    assert "packed" not in str(err.value) and "shapes cannot be multiplied" in str(err.value)
    assert getattr(rep.pipe.text_encoder, "_dmq", None) is None and getattr(rep.pipe.unet, "_dmq", None) is None
    _assert_same(before, _state(rep.pipe))
    assert torch.equal(generate(rep, 2), image)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be an integer >= 1, got 0"),
    ({"num_inference_steps": -1}, ValueError, "num_inference_steps must be an integer >= 1, got -1"),
    ({"num_inference_steps": 2.0}, TypeError, r"num_inference_steps must be an integer, got 2.0 \(float\)"),
    ({"batch_size": "2"}, TypeError, r"batch_size must be an integer, got '2' \(str\)"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1, got 0"),
    ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number, got nan"),
    ({"guidance_scale": float("inf")}, ValueError, "guidance_scale must be a finite number, got inf"),
    ({"guidance_scale": "7.5"}, TypeError, r"guidance_scale must be a real number, got '7.5' \(str\)"),
    ({"seed": -1}, ValueError, "seed must be an integer >= 0"),
    ({"pack": "no"}, TypeError, "pack must be True or False"),
    ({"timestep_selection": 3}, TypeError, "timestep_selection must be one of all, uniform, normal"),
    ({"timestep_selection": "most"}, ValueError, "unknown step policy 'most' for timestep_selection"),
    ({"include": 3}, TypeError, "include must be a glob string"),
    ({"text_encoders": "w8a8"}, ValueError, "text encoders are quantized weight-only"),
    ({"call_kwargs": {"prompt_embeds": None}}, TypeError, "call_kwargs must be a list of dicts"),
])
def test_arguments_are_checked_at_the_door(sd, kwargs, error, message):
    """Defect 5: bad values fail before anything runs, naming the argument, the value and what is allowed."""
    rep, before, _ = sd
    args = {"call_kwargs": rep.calls[:1], "num_inference_steps": 2, "progress": False, **kwargs}
    with pytest.raises(error, match=message):
        quantize_pipeline(rep.pipe, "w8a8", **args)
    _assert_same(before, _state(rep.pipe))


def test_non_finite_first_call_fails_fast(sd):
    """Defect 6: NaN inputs make the backbone return NaN: quantize_pipeline stops at the first call, unchanged."""
    rep, before, image = sd
    calls = [{**rep.calls[0], "prompt_embeds": torch.full((1, 6, 16), float("nan"))}, rep.calls[1]]
    seen = []
    handle = rep.pipe.unet.register_forward_pre_hook(lambda m, a: seen.append(1))
    try:
        # guidance batches [uncond, cond]: the NaN embeddings spoil the cond half, 1 x 4 x 8 x 8 of 2 x 4 x 8 x 8
        with pytest.raises(ValueError, match=r"first calibration call of StableDiffusionPipeline made the backbone "
                                             r"return 256 non-finite \(NaN/inf\) values of 512"):
            quantize_pipeline(rep.pipe, "w8a8", call_kwargs=calls, num_inference_steps=3,
                              guidance_scale=rep.guidance_scale, progress=False)
    finally:
        handle.remove()
    assert len(seen) == 1  # stopped at the first backbone call, not after the whole run
    _assert_same(before, _state(rep.pipe))
    assert torch.equal(generate(rep, 2), image)


def test_a_string_prompt_is_one_prompt():
    from pipelines.quantize import _calls

    assert _calls("a cat", None, 4) == [{"prompt": ["a cat"]}]
    with pytest.raises(TypeError, match="prompts must hold prompt strings only"):
        _calls(["a cat", 3], None, 1)


class _Payload:
    ran = False

    def __reduce__(self):
        return (_mark, ())


def _mark():
    _Payload.ran = True
    return {}


def test_load_clip_never_unpickles_code(tmp_path):
    """Defect 7: a local CLIP file goes through torch.load(weights_only=True): a pickled payload is refused."""
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"visual.proj": _Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="not a state dict that torch.load\\(weights_only=True\\) accepts"):
        load_clip(str(path))
    assert not _Payload.ran
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ValueError, match="holds a Tensor, not a state dict"):
        load_clip(str(tmp_path / "tensor.pt"))


def test_dmq_summary_reports_no_nonfinite_for_a_clean_pipeline():
    rep = build("ddim")
    quantize_pipeline(rep.pipe, "w8a8", call_kwargs=rep.calls[:1], num_inference_steps=2, progress=False)
    assert dmq.summary(rep.pipe.unet)["nonfinite"] == {}


_DDPM = {}


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], max_examples=40)
@given(steps=st.one_of(ANY, st.just(1)), batch=st.one_of(ANY, st.just(1)), guidance=ANY,
       seed=st.one_of(ANY, st.just(0)), selection=ANY, include=ANY, pack=st.one_of(ANY, st.just(False)),
       config=st.one_of(ANY, st.just("w8a8")))
def test_quantize_pipeline_accepts_or_rejects_clearly(steps, batch, guidance, seed, selection, include, pack, config):
    """Property: any arguments give a quantized pipeline or a TypeError / ValueError, and an error leaves the
    pipeline as it was."""
    rep = _DDPM.get("rep") or _DDPM.setdefault("rep", build("ddpm"))
    before = [(n, type(m)) for n, m in rep.pipe.unet.named_modules()]
    try:
        quantize_pipeline(rep.pipe, config, call_kwargs=rep.calls[:1], num_inference_steps=steps, batch_size=batch,
                          guidance_scale=guidance, seed=seed, timestep_selection=selection, include=include,
                          pack=pack, progress=False)
    except (TypeError, ValueError) as e:
        assert str(e)
        assert [(n, type(m)) for n, m in rep.pipe.unet.named_modules()] == before
        assert getattr(rep.pipe.unet, "_dmq", None) is None
        return
    if pack:
        _DDPM.pop("rep")
    else:
        restore_pipeline(rep.pipe)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=30)
@given(value=ANY, other=ANY)
def test_pipeline_helpers_accept_or_reject_clearly(tmp_path_factory, value, other):
    from pipelines import use_sampler
    from pipelines.quantize import find_backbone
    from pipelines.serialization import load_quantized

    rep = _DDPM.get("rep") or _DDPM.setdefault("rep", build("ddpm"))
    scheduler = rep.pipe.scheduler
    missing = tmp_path_factory.mktemp("none") / "missing"  # paths only inside a temporary folder
    for call in (lambda: find_backbone(value), lambda: restore_pipeline(value), lambda: use_sampler(value, "deis"),
                 lambda: use_sampler(rep.pipe, value), lambda: load_quantized(missing if isinstance(value, str)
                                                                              else value, other)):
        try:
            call()
        except (TypeError, ValueError) as e:
            assert str(e)
        assert rep.pipe.scheduler is scheduler or isinstance(value, str)
        rep.pipe.scheduler = scheduler
