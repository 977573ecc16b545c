"""The three verbs: :func:`quantize`, :func:`calibrate`, :func:`freeze`, plus :func:`restore`."""

from __future__ import annotations

import collections
import contextlib
import copy
import fnmatch
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from dmq import attention, structure
from dmq import validation as check
from dmq.calibration import ModelClock, StepPolicy, TimestepHook, call_scope, get_policy
from dmq.config import QuantConfig, QuantSpec, get_config
from dmq.embedding import QuantEmbedding, quantizable
from dmq.modules import AttentionQuantizers, QuantConv2d, QuantLinear
from dmq.nonfinite import nonfinite_report, warn_nonfinite
from dmq.quantizer import NotCalibratedError, TensorQuantizer
from dmq.spill import is_released
from dmq.transaction import Snapshot, covering, transaction

logger = logging.getLogger(__name__)


@dataclass
class QuantState:
    """What :func:`quantize` leaves on the model (``model._dmq``)."""

    config: QuantConfig
    hook: TimestepHook | None
    modules: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    calibration_points: int = 0
    calibration_seconds: float = 0.0
    frozen: bool = False
    packed: bool = False
    budget: dict = field(default_factory=dict)  # memory_budget: total and fixed bytes, from the float model
    per_sample: list[str] = field(default_factory=list)  # layers quantized weight-only as one token per sample
    originals: dict = field(default_factory=dict)  # parameters a folded transform changed: name -> original
    learned_overrides: dict = field(default_factory=dict)  # module -> weight QuantSpec chosen by format search
    transformed: bool = False
    report: dict = field(default_factory=dict)  # what the PTQ methods did (errors, cache, time)
    unobserved: list[str] = field(default_factory=list)  # quantizers calibration never reached (now dynamic)
    clock: ModelClock | None = None  # the model's timestep convention and calibration mode

    def __post_init__(self) -> None:
        if self.clock is None:
            self.clock = self.hook.clock if self.hook is not None else ModelClock(*self.config.timestep_range)


def _state(model: nn.Module) -> QuantState:
    check.module("model", model)
    st = getattr(model, "_dmq", None)
    if st is None:
        raise ValueError("model is not quantized: call dmq.quantize(model, config) first")
    return st


def unet_skip_splits(model: nn.Module) -> dict[str, int]:
    """Split points of the layers that consume a U-Net skip concatenation: ``{module name: channels of the first
    half}`` for ``conv1`` and ``conv_shortcut`` of every up-block resnet.

    diffusers U-Nets keep a stack of skip tensors (``conv_in``'s output, then every down-block resnet and
    downsampler output); each up-block resnet pops one and runs on ``cat([hidden_states, skip], dim=1)``.
    Returns ``{}`` for models without ``down_blocks``/``up_blocks`` or with an unexpected layout.
    """
    downs, ups, conv_in = (getattr(model, n, None) for n in ("down_blocks", "up_blocks", "conv_in"))
    if downs is None or ups is None or not isinstance(conv_in, nn.Conv2d):
        return {}
    stack = [conv_in.out_channels]
    for db in downs:
        for r in getattr(db, "resnets", []):
            stack.append(_out_channels(r))
        if getattr(db, "downsamplers", None):
            stack.append(_out_channels(db.downsamplers[0]))
    if any(c is None for c in stack):
        logger.info("U-Net down path with a block of unknown output width: no shortcut split")
        return {}
    splits: dict[str, int] = {}
    for i, ub in enumerate(ups):
        for j, r in enumerate(getattr(ub, "resnets", [])):
            if not stack or not hasattr(r, "conv1"):
                logger.info("unexpected U-Net layout at up_blocks.%d: no shortcut split", i)
                return {}
            skip = stack.pop()
            first = r.conv1.in_channels - skip
            if first <= 0:
                logger.info("unexpected U-Net channels at up_blocks.%d.resnets.%d: no shortcut split", i, j)
                return {}
            splits[f"up_blocks.{i}.resnets.{j}.conv1"] = first
            if getattr(r, "conv_shortcut", None) is not None and isinstance(r.conv_shortcut, nn.Conv2d):
                splits[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = first
    return splits


def _out_channels(block: nn.Module) -> int | None:
    """Output channels of a U-Net resnet or downsampler: its ``out_channels``, else those of its last convolution
    (``SpatioTemporalResBlock`` and other wrappers carry no ``out_channels`` of their own)."""
    c = getattr(block, "out_channels", None)
    if isinstance(c, int):
        return c
    convs = [m for m in block.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    return convs[-1].out_channels if convs else None


def _selected(name: str, include: Sequence[str] | None, exclude: Sequence[str]) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize(model: nn.Module, config: str | QuantConfig, *, include: Sequence[str] | None = None,
             exclude: Sequence[str] | None = None, inplace: bool = True) -> nn.Module:
    """Swap the model's Linear and Conv2d layers (and the matmuls of diffusers attention modules) for quantized
    ones, selected by glob on qualified module names.

    Args:
        model: any ``nn.Module`` (a diffusers U-Net or DiT backbone, or a plain stack of layers).
        config: a :class:`~dmq.config.QuantConfig` or a preset name (``dmq.preset_names()``).
        include: only modules matching one of these globs (default: all).
        exclude: extra globs to keep in full precision, on top of ``config.keep_fp``.
        inplace: ``False`` quantizes a deep copy and leaves ``model`` untouched.

    Weights are fake-quantized now; static activation quantizers need :func:`calibrate` then :func:`freeze`.
    If anything fails, the model is left exactly as it was.
    """
    check.module("model", model)
    cfg = get_config(config)
    include, exclude = check.globs("include", include), check.globs("exclude", exclude)
    check.boolean("inplace", inplace)
    if getattr(model, "_dmq", None) is not None:
        raise ValueError("model is already quantized; dmq.restore(model) first")
    if not inplace:
        return _quantize(copy.deepcopy(model), cfg, include, exclude)
    with transaction(model):
        return _quantize(model, cfg, include, exclude)


def _quantize(model: nn.Module, cfg: QuantConfig, include: tuple[str, ...] | None,
              exclude: tuple[str, ...] | None) -> nn.Module:
    roles = {**structure.classify(model), **structure.tables(model)}
    # diffusers models name modules that must stay float32 (substrings of module names, as diffusers matches them)
    fp32 = tuple(f"*{m}*" for m in getattr(model, "_keep_in_fp32_modules", None) or ())
    excl = structure.expand_patterns(model, tuple(cfg.keep_fp) + tuple(exclude or ()), roles) + fp32
    splits = unet_skip_splits(model) if cfg.shortcut_split and cfg.act is not None else {}
    state = QuantState(cfg, None)
    targets = [(n, m) for n, m in model.named_modules() if n and _selected(n, include, excl)]
    ps_spec, emb_spec = cfg.per_sample_spec, cfg.embedding_spec
    tables = {n: _override(cfg, n, emb_spec) for n, m in targets if emb_spec is not None and quantizable(m)}
    if cfg.memory_budget is not None:  # fail before any work when the budget is out of reach
        from dmq import budget

        names = [n for n, m in targets if type(m) in (nn.Linear, nn.Conv2d)]
        state.budget = {"total": budget.check_reachable(model, names, cfg, tables),
                        "fixed": budget.fixed_bytes(model, names, tables)}
    for name, mod in targets:
        if name in tables:  # a lookup table: weight-only, its rows quantized along the embedding dimension
            _set_child(model, name, QuantEmbedding.from_float(mod, tables[name]))
            state.modules.append(name)
            continue
        if ps_spec is not None and roles.get(name) in structure.PER_SAMPLE:  # one token per sample: weight-only
            mcfg = cfg.replace(weight=_override(cfg, name, ps_spec), act=None)
            if type(mod) in (nn.Linear, nn.Conv2d):
                state.per_sample.append(name)
        else:
            mcfg = cfg.replace(weight=cfg.weight_for(name)) if cfg.overrides else cfg  # per-module overrides
        if type(mod) is nn.Linear and (cfg.weight is not None or cfg.act is not None):
            _set_child(model, name, QuantLinear.from_float(mod, mcfg))
        elif type(mod) is nn.Conv2d and (cfg.weight is not None or cfg.act is not None):
            _set_child(model, name, QuantConv2d.from_float(mod, mcfg, splits.get(name)))
            if name in splits:
                state.splits[name] = splits[name]
        else:
            continue
        state.modules.append(name)
    if cfg.attn is not None:
        for name, mod in targets:
            proc = getattr(mod, "processor", None)
            if proc is None or not hasattr(mod, "set_processor"):
                continue
            if attention.attach(mod, AttentionQuantizers(cfg, proc)) is None:
                logger.info("attention %s uses %s: its matmuls stay in full precision", name, type(proc).__name__)
                continue
            state.attention.append(name)
    if not state.modules and not state.attention:
        raise ValueError(
            f"nothing to quantize in {type(model).__name__}: no nn.Linear / nn.Conv2d / nn.Embedding / diffusers "
            f"attention module matched include={list(include) if include else None} outside keep_fp/exclude"
        )
    state.hook = TimestepHook(model, *cfg.timestep_range, clock=state.clock)
    model._dmq = state
    logger.info("dmq: quantized %d layers and %d attention modules with %s", len(state.modules),
                len(state.attention), cfg.name)
    return model


def _override(cfg: QuantConfig, name: str, spec: QuantSpec) -> QuantSpec:
    """``spec``, unless one of ``cfg.overrides`` names the module."""
    return cfg.weight_for(name) if any(fnmatch.fnmatchcase(name, g) for g, _ in cfg.overrides) else spec


def matmul_layers(model: nn.Module, st: QuantState) -> list[str]:
    """The quantized Linear / Conv layers with a weight format (not the lookup tables): what the budget allocator,
    learned rounding and mixed precision work on."""
    return [n for n in st.modules if model.get_submodule(n).weight_spec is not None
            and not isinstance(model.get_submodule(n), QuantEmbedding)]


def quantizers(model: nn.Module) -> dict[str, TensorQuantizer]:
    """Every activation quantizer of the model, by name."""
    check.module("model", model)
    return {n: m for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], object], *,
              steps: str | StepPolicy | None = None, spill_dir: str | os.PathLike | None = None) -> nn.Module:
    """Run ``forward_loop(model)`` with observers active.

    Every backbone call is a calibration point, at the timestep its forward receives, if the step policy
    (``steps``, default ``config.steps``) accepts it. The model computes in full precision meanwhile (float weights,
    activations passed through), so the loop follows the FP trajectory. Statistics stream: memory does not grow
    with the number of calls.

    With PTQ methods in the config the loop runs more than once (each run sees the same calibration trajectory):
    a statistics run for SmoothQuant, after which smoothing is folded, inputs rotated and low-rank branches split
    off (:func:`dmq.transforms.apply_transforms`); the observer run; then runs that stream each layer's inputs
    into a bounded cache for format search and AdaRound / GPTQ (:func:`dmq.rounding.reconstruct`). What they did
    is in ``dmq.summary(model)["methods"]``.

    Learned rounding keeps its memory near the float model's (:func:`dmq.rounding.reconstruct`): captured layer
    inputs beyond ``config.cache_mb`` wait in temporary files, and a layer's float weight moves to a file mapping
    once its rounding is learned (same values, read back only if something reads it: :func:`restore`,
    :func:`full_precision`, another calibration). Both go to ``spill_dir`` (default: ``$TMPDIR``); where it cannot
    be written they stay in memory, with a warning.

    Non-finite activation values (NaN, inf) are skipped and counted per quantizer and timestep bin
    (``dmq.summary(model)["nonfinite"]``), with one warning naming the worst layers. If ``forward_loop`` (or
    anything else) raises, the model is left exactly as it was before the call, statistics included.
    """
    st = _state(model)
    check.function("forward_loop", forward_loop)
    spill_dir = check.directory("spill_dir", spill_dir)
    if st.frozen:
        raise ValueError("model is frozen; calibrate before dmq.freeze")
    policy = get_policy(steps if steps is not None else st.config.steps)
    cfg = st.config
    # transforms fold into the float weights in place: only they need a copy of every weight for the rollback.
    # Learned rounding, format search and the budget replace weight_fq (dmq.rounding.set_weight_fq): rolled back
    # by reference, with no copy.
    folds = cfg.smooth is not None or cfg.rotation is not None or bool(cfg.lowrank)
    before = nonfinite_report(model)
    with transaction(model, clone_all=folds and not st.transformed):
        _calibrate(model, st, forward_loop, policy, spill_dir)
    warn_nonfinite(model, before)
    return model


def _calibrate(model: nn.Module, st: QuantState, forward_loop: Callable[[nn.Module], object],
               policy: StepPolicy, spill_dir: str | None = None) -> None:
    cfg = st.config
    t0 = time.perf_counter()
    if (cfg.smooth is not None or cfg.rotation is not None or cfg.lowrank) and not st.transformed:
        from dmq.transforms import apply_transforms

        st.report.update(apply_transforms(model, st, lambda: _run(model, forward_loop, policy, observe=False)))
        st.transformed = True
    moments = None
    if cfg.memory_budget is not None and not st.report.get("budget"):
        from dmq.budget import SecondMoments

        moments = SecondMoments(model, matmul_layers(model, st))
    try:
        points = _run(model, forward_loop, policy, observe=True)
    finally:
        stats = moments.remove() if moments is not None else None
    if stats is not None:
        _apply_budget(model, st, stats)
    if cfg.rounding != "rtn" or cfg.format_search or (st.per_sample and cfg.per_sample_rounding != "rtn"):
        from dmq.rounding import reconstruct

        st.report.update(reconstruct(model, st, lambda: _run(model, forward_loop, policy, observe=False), spill_dir))
    st.calibration_points += points
    st.calibration_seconds += time.perf_counter() - t0
    logger.info("dmq: calibrated on %d backbone calls in %.1f s", points, time.perf_counter() - t0)


def _apply_budget(model: nn.Module, st: QuantState, moments: dict) -> None:
    """Per-layer weight formats within ``config.memory_budget`` (:mod:`dmq.budget`), kept as learned overrides."""
    from dmq.budget import allocate_budget
    from dmq.rounding.layer import requantize_rtn

    names = matmul_layers(model, st)
    specs, report = allocate_budget(model, names, st.config, moments, st.budget["total"], st.budget["fixed"])
    for name, spec in specs.items():
        mod = model.get_submodule(name)
        if spec != mod.weight_spec:
            mod.weight_spec = spec
            requantize_rtn(mod)
            st.learned_overrides[name] = spec
    st.report["budget"] = report
    logger.info("dmq: memory budget %.2f MiB: planned %.2f MiB, formats %s", report["budget_bytes"] / 2 ** 20,
                report["planned_bytes"] / 2 ** 20, report["formats"])


def _run(model: nn.Module, forward_loop: Callable[[nn.Module], object], policy: StepPolicy, observe: bool) -> int:
    """One run of the calibration loop in calibration mode; ``observe=False`` keeps the activation observers out
    (a statistics or capture run). Returns the number of calibration points."""
    policy.reset()
    qs = list(quantizers(model).values())
    enabled = [q.enabled for q in qs]
    if not observe:
        for q in qs:
            q.enabled = False
    clock = _state(model).clock
    clock.calibrating, clock.policy, clock.points = True, policy, 0
    try:  # the scope covers loops that run submodules directly; each call of the model gets its own on top
        with torch.no_grad(), call_scope(calibrating=True, clock=clock):
            forward_loop(model)
    finally:
        clock.calibrating, clock.policy = False, None
        for q, e in zip(qs, enabled):
            q.enabled = e
    return clock.points


class _NoSteps(StepPolicy):
    def accept(self, t, lo, hi) -> bool:
        return False


@contextlib.contextmanager
def full_precision(model: nn.Module) -> Iterator[nn.Module]:
    """Run a quantized, not yet frozen model in full precision inside the ``with`` block, observing nothing: a
    second denoiser of a pipeline stays on the full-precision trajectory while the first one calibrates."""
    st = _state(model)
    if st.frozen:
        raise ValueError("full_precision needs a model that is not frozen")
    clock = st.clock
    if clock.calibrating:
        raise ValueError("the model is calibrating already")
    clock.calibrating, clock.policy = True, _NoSteps()
    try:
        yield model
    finally:
        clock.calibrating, clock.policy = False, None


def learned_config(model: nn.Module) -> QuantConfig:
    """The model's config with the per-module weight formats that calibration chose (format search) as overrides:
    ``dmq.quantize(fresh_model, learned_config(model))`` builds a model that can ``load_state_dict`` this one."""
    st = _state(model)
    extra = tuple((name, spec) for name, spec in st.learned_overrides.items())
    return st.config.replace(overrides=extra + tuple(st.config.overrides)) if extra else st.config


def freeze(model: nn.Module, *, pack: bool = True, journal_dir: str | os.PathLike | None = None) -> nn.Module:
    """Fix every static activation quantizer's per-bin scales from its statistics, then drop the observers.

    A quantizer that calibration never reached (its layer sits on a branch the calibration calls did not take)
    has no statistics to fix a scale from: it falls back to dynamic per-tensor quantization of the same format,
    with a logged warning, listed in ``summary(model)["unobserved"]``. With no calibration call at all this raises
    :class:`~dmq.quantizer.NotCalibratedError`.

    With ``pack=True`` (default) every quantized layer's float weight is released and replaced by packed codes and
    scales (:mod:`dmq.packed`): resident memory drops, layers run integer / FP8 GEMMs or dequantize on the fly
    (:mod:`dmq.kernels`), outputs match the fake-quant model, and :func:`dmq.save` can write the model. The original
    float weights are gone: keep them with ``pack=False`` or ``quantize(..., inplace=False)``. A model whose
    layers are offloaded one by one (accelerate hooks, weights on the meta device) is not packed.

    All or nothing: a static quantizer without finite calibration data raises :class:`NotCalibratedError` naming
    it and what it saw, before anything changes; any other failure rolls the model back to where it was. Packing
    frees each float weight as soon as its layer is packed (the peak stays near the float model, not the float
    model plus the packed one): until freeze has succeeded, the released weights wait in a rollback journal, a
    temporary file in ``journal_dir`` (default: the system's temporary folder, ``$TMPDIR``) deleted on success and
    on failure (:mod:`dmq.journal`). A weight shared with a module outside the quantized layers stays in memory.
    """
    st = _state(model)
    check.boolean("pack", pack)
    journal_dir = check.directory("journal_dir", journal_dir)
    params = {}
    problems, unobserved = [], []
    for name, q in quantizers(model).items():
        try:
            params[name] = q.frozen_params()
        except NotCalibratedError as e:
            finite, nonfinite = q.value_counts()
            if st.calibration_points and not sum(finite) and not sum(nonfinite):
                unobserved.append(name)  # its layer never ran on the calibration calls: dynamic fallback
            else:
                problems.append(f"{name}: {e}")
    if problems:
        raise NotCalibratedError(
            f"{len(problems)} static activation quantizer(s) cannot be frozen: {'; '.join(problems[:5])}"
            f"{'; ...' if len(problems) > 5 else ''}. Run dmq.calibrate(model, forward_loop) with finite inputs "
            "before dmq.freeze (or use a dynamic / weight-only config); nothing was frozen")
    with transaction(model) as snap:
        _freeze(model, st, params, pack, unobserved, snap or covering(model), journal_dir)
    if st.packed:  # kernel state (int4pack, oneDNN prepacked weights) once the snapshot has let the float weights go
        from dmq import kernels

        for name in st.modules:
            if isinstance(model.get_submodule(name), QuantLinear):
                kernels.prepare(model.get_submodule(name))
    return model


def _freeze(model: nn.Module, st: QuantState, params: dict, pack: bool, unobserved: list[str],
            snap: Snapshot | None = None, journal_dir: str | os.PathLike | None = None) -> nn.Module:
    for name, q in quantizers(model).items():
        if name in unobserved:
            q.fall_back_to_dynamic()
        else:
            q.freeze(params[name])
    if unobserved:
        st.unobserved = list(unobserved)
        logger.warning("dmq: %d activation quantizer(s) saw no input in %d calibration calls (a branch the "
                       "calibration trajectory never takes: %s%s); they quantize dynamically (per-tensor min-max "
                       "of each input) instead of with a static scale", len(unobserved), st.calibration_points,
                       ", ".join(unobserved[:5]), ", ..." if len(unobserved) > 5 else "")
    if pack and not st.packed and _offloaded(model):  # hooks reload float weights by name: keep them, unpacked
        logger.info("dmq: some layers are offloaded (weights on the meta device): the weights stay unpacked")
    elif pack and not st.packed:
        uses = collections.Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
        for name in st.modules:
            mod = model.get_submodule(name)
            old = mod.weight
            try:
                mod.pack(prepare=False)  # kernel state after the transaction (freeze), not beside the float weights
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            # to the journal, unless tied or mapped from a file already (calibration's learned rounding did that)
            if snap is not None and mod.weight is not old and uses[id(old)] == 1 and not is_released(mod, old):
                snap.spill(old, journal_dir)
        st.packed = True
        logger.info("dmq: packed %d layers", len(st.modules))
    st.frozen = True
    if st.packed:
        from dmq.backend import attach  # a diffusers model becomes a dmq-quantized diffusers model

        attach(model)
    return model


def _offloaded(model: nn.Module) -> bool:
    """accelerate offloading by layer or block: some quantized layer's weight is on the meta device, and hooks bring
    it by name at each call (whole-model offload keeps real weights and packs normally)."""
    return any(isinstance(m, (QuantLinear, QuantConv2d, QuantEmbedding)) and not m.packed
               and m.weight.device.type == "meta" for m in model.modules())


def restore(model: nn.Module, *, allow_dequantized: bool = False) -> nn.Module:
    """Undo :func:`quantize`: the original float modules, weights and attention processors come back.

    After a packed :func:`freeze` the original float weights no longer exist, and this raises ``ValueError``;
    ``allow_dequantized=True`` gives float modules holding the dequantized (quantized-grid) weights instead, with a
    logged warning.
    """
    st = _state(model)
    check.boolean("allow_dequantized", allow_dequantized)
    if st.packed and any(model.get_submodule(n).weight_layouts for n in st.modules):
        if not allow_dequantized:
            raise ValueError(
                "dmq.freeze packed this model and released its float weights, so they cannot be restored: pass "
                "allow_dequantized=True for float modules holding the dequantized weights, or freeze with "
                "pack=False / quantize with inplace=False to keep the originals"
            )
        learned = [n for n in st.modules if any(getattr(model.get_submodule(n), b, None) is not None
                                                for b in ("rotation", "lowrank_down"))]
        if st.originals or learned:
            raise ValueError("this packed model carries learned transforms (smoothing, rotation or a low-rank "
                             "branch) that plain float modules cannot hold: it cannot be restored")
        logger.warning("dmq.restore: the model was packed; restoring float modules with dequantized weights")
    with transaction(model):
        for name in st.modules:
            _set_child(model, name, model.get_submodule(name).to_float())
        for name in st.attention:
            attention.detach(model.get_submodule(name))
        with torch.no_grad():  # undo folded transforms (smoothing scales live in the float parameters); last, as
            for pname, value in st.originals.items():  # in-place changes of large weights cannot be rolled back
                model.get_parameter(pname).copy_(value)
        if st.hook is not None:
            st.hook.remove()
        del model._dmq
        from dmq.backend import detach

        detach(model)
    return model


dequantize = restore


def summary(model: nn.Module) -> dict:
    """Counts and timing of a quantized model, for reports."""
    st = _state(model)
    return {
        "config": st.config.name, "layers": len(st.modules), "attention": len(st.attention),
        "shortcut_splits": len(st.splits), "calibration_points": st.calibration_points,
        "calibration_seconds": st.calibration_seconds, "frozen": st.frozen, "packed": st.packed,
        "observer_bytes": sum(q.observer.nbytes for q in quantizers(model).values() if q.observer is not None),
        "methods": dict(st.report), "nonfinite": nonfinite_report(model), "unobserved": list(st.unobserved),
        "timestep_range": st.clock.range, "observed_timesteps": st.clock.observed,
    }
