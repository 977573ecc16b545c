"""Quantization configs: frozen dataclasses and named presets.

A :class:`QuantSpec` describes one tensor quantizer (format, granularity, symmetry, static or dynamic scale, range
estimator, timestep bins). A :class:`QuantConfig` says which spec applies to weights, to the inputs of Linear/Conv2d
layers, and to the attention matmul operands, and which modules stay in full precision. Anywhere a config is
accepted, a preset name works too: ``dmq.get_config("w8a8")``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass, field, replace

from dmq import formats
from dmq import validation as check
from dmq.calibration import AllSteps, NormalSteps, StepPolicy, UniformSteps

GRANULARITIES = ("tensor", "channel", "group", "block", "token")
ROUNDINGS = ("rtn", "adaround", "gptq")
RECONSTRUCTIONS = ("layer", "block")
ROTATIONS = ("hadamard", "orthogonal")
ESTIMATORS = ("minmax", "percentile", "mse", "fp_bias")

# Layers that stay in 16 bits unless ``keep_fp`` is overridden. Entries are globs on qualified module names or
# ``@role`` structural groups (:mod:`dmq.structure`: ``@first``, ``@last``, ``@embedder``, ``@modulation``,
# ``@context``, ``@per_sample``; ``@role<N%``: only while the role holds under N% of the parameters), found from module
# types and graph position on any backbone. The first and last layers stay: quantizing them costs 5-10 dB of ε SQNR
# for < 0.1% of the weights (``benchmarks/quant_keep_fp.json``). The timestep / class / pooled embedders stay while
# they are under 2% of the model (a U-Net's or Flux's single embedder: +2 dB on the bundled U-Net for 1.2% more
# bytes); a DiT's per-block embedders (16% of the bundled DiT) are quantized. adaLN modulation and the rest of the
# one-token-per-sample layers are quantized weight-only, group-wise, with GPTQ rounding (``QuantConfig.per_sample``).
DEFAULT_KEEP_FP = ("@first", "@last", "@embedder<2%")
# The 16-bit list of earlier releases (by name), for comparison and for users who want it.
LEGACY_KEEP_FP = (
    "conv_in", "conv_out", "*time_embedding*", "*time_proj*", "*time_emb_proj", "*timestep_embedder*",
    "*time_text_embed*", "*class_embedding*", "*class_embedder*", "*add_embedding*", "*adaln_single*",
    "*caption_projection*", "*context_embedder*", "*pos_embed*", "proj_out", "proj_out_*", "*norm_out*",
    "*norm1.linear", "*norm1_context.linear", "*norm.linear", "*.emb.*",
)
PER_SAMPLE_GROUP = 32  # group size of the weight-only per-sample layers (the bundled models have 32..192 channels)


@dataclass(frozen=True)
class QuantSpec:
    """One tensor quantizer.

    Args:
        format: a name from :func:`dmq.formats.names` (``"int8"``, ``"e4m3"``, ``"mxfp4"``, ``"nvfp4"``, ...).
        granularity: ``"tensor"``; ``"channel"`` (weights: one scale per output channel); ``"token"`` (activations:
            one scale per token / pixel, over the channel dimension, dynamic only); ``"group"`` (``group_size``
            consecutive elements of the reduction dimension share a scale); ``"block"`` (MX / NVFP4 formats, whose
            block size is part of the format).
        symmetric: symmetric around zero; asymmetric INT uses the unsigned grid ``uintN`` with a zero point.
        dynamic: scale computed online from each input (min-max), no calibration needed.
        estimator: range estimator for static scales: ``"minmax"``, ``"percentile"``, ``"mse"`` (clipping search
            minimising the quantization MSE) or ``"fp_bias"`` (LLM-FP4: search of the real-valued exponent bias of
            an FP grid, i.e. of its power-of-two-free scale, by reconstruction error; FP formats only).
        percentile: upper percentile for ``"percentile"``.
        timestep_bins: activation parameter sets over the timestep range (TFMQ-DM / ViDiT-Q); 1 = one set.
    """

    format: str
    granularity: str = "tensor"
    group_size: int = 128
    symmetric: bool = True
    dynamic: bool = False
    estimator: str = "minmax"
    percentile: float = 99.99
    timestep_bins: int = 1

    def __post_init__(self) -> None:
        for name in ("format", "granularity", "estimator"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"QuantSpec {name} must be a string, got {type(getattr(self, name)).__name__}")
        check.integer("QuantSpec group_size", self.group_size, minimum=1)
        check.integer("QuantSpec timestep_bins", self.timestep_bins, minimum=1)
        check.boolean("QuantSpec symmetric", self.symmetric)
        check.boolean("QuantSpec dynamic", self.dynamic)
        check.real("QuantSpec percentile", self.percentile)
        fmt = formats.get(self.format)  # ValueError listing the valid formats
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if fmt.is_block != (self.granularity == "block"):
            raise ValueError(f"format {self.format!r} needs granularity 'block' exactly when it is a block format "
                             "(mxfp4, mxfp6_*, mxfp8*, nvfp4)")
        if not self.symmetric and not isinstance(fmt, formats.IntFormat):
            raise ValueError(f"asymmetric quantization needs an INT format, got {self.format!r}")
        if self.estimator == "fp_bias" and not isinstance(fmt, formats.FloatFormat):
            raise ValueError(f"estimator 'fp_bias' needs a minifloat format (eXmY), got {self.format!r}")
        if self.group_size < 1 or self.timestep_bins < 1:
            raise ValueError("group_size and timestep_bins must be >= 1")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {self.percentile}")

    @property
    def fmt(self) -> formats.Format:
        """The element (or block) format; for asymmetric INT the unsigned grid of the same width."""
        fmt = formats.get(self.format)
        if not self.symmetric and isinstance(fmt, formats.IntFormat):
            return formats.IntFormat(fmt.bits, signed=False)
        return fmt


# The embedding tables (class / label embedders) of presets with weights under 8 bits: INT8, group-wise along the
# embedding dimension (8.5 bits per entry). A table row is a sample's whole class conditioning, added to the timestep
# embedding before every adaLN modulation: a 4-bit table costs 4-6 dB of ε SQNR (DiT-XL/2 replica, bundled DiT), an
# INT8 one at most 0.15 dB at W4. Presets with 8-bit weights keep their tables in 16 bits: INT8 tables cost 1.5 dB
# on the DiT-XL/2 replica at W8A8 (45.0 dB), and W8 meets its size goal without them (benchmarks/quant_tables.json).
TABLE_SPEC = QuantSpec("int8", "group", group_size=PER_SAMPLE_GROUP, estimator="mse")


@dataclass(frozen=True)
class QuantConfig:
    """What a quantized model quantizes.

    Args:
        weight: spec of Linear/Conv2d weights (always static, computed from the weight), or None.
        act: spec of Linear/Conv2d inputs, or None (weight-only).
        attn: spec of the attention matmul operands q, k, v (Q·Kᵀ and P·V), or None.
        attn_probs: spec of the softmax probabilities (default: ``attn``).
        keep_fp: globs of module names, or ``@role`` structural groups (:mod:`dmq.structure`), left in 16 bits.
        per_sample: weight spec of the layers that see one token per sample (timestep / class / pooled embedders and
            adaLN modulation, :data:`dmq.structure.PER_SAMPLE`), quantized weight-only: ``"auto"`` (the weight
            format, group-wise; block formats as they are), a :class:`QuantSpec`, or None (quantized like any other
            layer, activations included).
        per_sample_rounding: the weight rounding of those layers (``"rtn"``, ``"adaround"``, ``"gptq"``).
        embedding: weight spec of the ``nn.Embedding`` tables (class / label embedders), quantized weight-only, each
            row (one entry's vector) group- or block-wise along the embedding dimension; a lookup dequantizes only
            the rows it selects. ``"auto"``: :data:`TABLE_SPEC` (INT8 group-wise) with weights under 8 bits, the
            model's dtype with 8-bit weights (measured, see :data:`TABLE_SPEC`); a :class:`QuantSpec`; or None
            (tables stay in the model's dtype).
        memory_budget: size of the whole quantized backbone (every parameter and buffer): bits per parameter (a
            number up to 32, or ``"4.5bits"``) or bytes (a larger number, or ``"7GB"``, ``"512MiB"``). Calibration
            then picks each layer's weight format (:mod:`dmq.budget`); None: the config's formats as they are.
        shortcut_split: Q-Diffusion's split quantizers for the layer after a U-Net skip concatenation.
        timestep_range: the range the timestep bins cover (``[0, num_train_timesteps)``).
        steps: which backbone calls count as calibration points (:class:`dmq.calibration.StepPolicy`).
        name: preset name, for reports.
        rounding: weight rounding: ``"rtn"`` (round to nearest), ``"adaround"`` (learned up/down rounding on the INT
            or FP grid, AdaRound / FP4DiT) or ``"gptq"`` (Hessian error feedback). Learned in :func:`dmq.calibrate`.
        reconstruction: AdaRound's objective: ``"layer"`` (each layer's output) or ``"block"`` (BRECQ: the output of
            each transformer / resnet / attention block; layers outside blocks stay layer-wise).
        rounding_iters: optimisation steps per layer (or block) of AdaRound.
        smooth: SmoothQuant channel balancing of the Linear inputs: None (off), an alpha in [0, 1], or ``"search"``
            (alpha chosen per layer group by output error). Scales are folded into the preceding norm, adaLN
            modulation or value projection; layers without a foldable predecessor are left alone.
        rotation: ``"hadamard"`` or ``"orthogonal"`` rotation of Linear inputs (QuaRot / OstQuant), or None.
        lowrank: rank of a 16-bit low-rank branch per layer (SVDQuant); 0 = none.
        format_search: LLM-FP4 per-layer search of the weight's E/M split (same bit width) and exponent bias.
        overrides: ``(glob, weight spec)`` pairs: modules whose name matches a glob use that weight spec (the first
            match wins); a mixed-precision allocation is such a list.
        calib_rows: rows (tokens / pixels) per layer kept in the reconstruction cache.
        cache_mb: memory bound of the reconstruction cache: layers are captured in as many passes as needed.
    """

    weight: QuantSpec | None
    act: QuantSpec | None = None
    attn: QuantSpec | None = None
    attn_probs: QuantSpec | None = None
    keep_fp: tuple[str, ...] = DEFAULT_KEEP_FP
    shortcut_split: bool = True
    timestep_range: tuple[float, float] = (0.0, 1000.0)
    steps: StepPolicy = field(default_factory=AllSteps)
    name: str = "custom"
    rounding: str = "rtn"
    reconstruction: str = "layer"
    rounding_iters: int = 500
    smooth: float | str | None = None
    rotation: str | None = None
    lowrank: int = 0
    format_search: bool = False
    overrides: tuple[tuple[str, QuantSpec], ...] = ()
    calib_rows: int = 2048
    cache_mb: float = 64.0
    per_sample: QuantSpec | str | None = "auto"
    per_sample_rounding: str = "gptq"
    memory_budget: float | str | None = None
    embedding: QuantSpec | str | None = "auto"

    def __post_init__(self) -> None:
        self._check_types()
        self._check_methods()
        if self.memory_budget is not None:
            from dmq.budget import budget_bytes

            budget_bytes(self.memory_budget, 1)  # TypeError / ValueError on a malformed budget
            if self.weight is None:
                raise ValueError("memory_budget allocates weight formats: set config.weight")
        for name in ("per_sample", "embedding"):
            v = getattr(self, name)
            if not (v is None or v == "auto" or isinstance(v, QuantSpec)):
                raise ValueError(f"{name} must be 'auto', a QuantSpec or None, got {v!r}")
            if isinstance(v, QuantSpec) and (v.dynamic or v.granularity == "token"):
                raise ValueError(f"{name} is a weight spec: static, with granularity 'tensor', 'channel', 'group' "
                                 f"or 'block'; got dynamic={v.dynamic}, granularity={v.granularity!r}")
        if self.per_sample_rounding not in ROUNDINGS:
            raise ValueError(f"per_sample_rounding must be one of {ROUNDINGS}, got {self.per_sample_rounding!r}")
        if isinstance(self.keep_fp, str) or not all(isinstance(k, str) for k in self.keep_fp):
            raise ValueError(f"keep_fp must be a tuple of globs or '@role' names, got {self.keep_fp!r}")
        if self.weight is None and self.act is None and self.attn is None:
            raise ValueError("a QuantConfig needs at least one of weight, act, attn")
        if self.weight is not None and (self.weight.dynamic or self.weight.granularity == "token"):
            raise ValueError("weights are quantized statically; 'dynamic' and 'token' apply to activations only")
        for s in (self.act, self.attn, self.attn_probs):
            if s is not None and s.granularity == "channel":
                raise ValueError("activations use 'tensor', 'token', 'group' or 'block' granularity, not 'channel'")
            if s is not None and s.granularity == "token" and not s.dynamic:
                raise ValueError("per-token activation quantization is dynamic (online); set dynamic=True")
            if s is not None and not s.dynamic and s.granularity != "tensor":
                raise ValueError("static (calibrated) activation quantizers are per tensor; use dynamic=True for "
                                 "'token', 'group' or 'block' granularity")
        lo, hi = self.timestep_range
        if not hi > lo:
            raise ValueError(f"timestep_range must be (lo, hi) with hi > lo, got {self.timestep_range}")

    def _check_types(self) -> None:
        for name in ("weight", "act", "attn", "attn_probs"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), QuantSpec):
                raise TypeError(f"QuantConfig {name} must be a QuantSpec or None, got "
                                f"{type(getattr(self, name)).__name__}")
        object.__setattr__(self, "keep_fp", check.globs("QuantConfig keep_fp", self.keep_fp) or ())
        tr = self.timestep_range
        if not isinstance(tr, (tuple, list)) or len(tr) != 2:
            raise TypeError(f"QuantConfig timestep_range must be a pair (lo, hi), got {tr!r}")
        object.__setattr__(self, "timestep_range", tuple(check.real("QuantConfig timestep_range", v) for v in tr))
        if not isinstance(self.steps, StepPolicy):
            raise TypeError(f"QuantConfig steps must be a StepPolicy, got {type(self.steps).__name__}")
        for name in ("shortcut_split", "format_search"):
            check.boolean(f"QuantConfig {name}", getattr(self, name))
        for name in ("rounding_iters", "lowrank", "calib_rows"):
            check.integer(f"QuantConfig {name}", getattr(self, name))
        check.real("QuantConfig cache_mb", self.cache_mb)
        if not isinstance(self.name, str):
            raise TypeError(f"QuantConfig name must be a string, got {type(self.name).__name__}")

    def _check_methods(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {self.reconstruction!r}")
        if self.rotation is not None and self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be None or one of {ROTATIONS}, got {self.rotation!r}")
        if self.smooth is not None and self.smooth != "search" and not (
                isinstance(self.smooth, (int, float)) and 0.0 <= self.smooth <= 1.0):
            raise ValueError(f"smooth must be None, 'search' or an alpha in [0, 1], got {self.smooth!r}")
        if self.lowrank < 0 or self.rounding_iters < 0 or self.calib_rows < 1 or self.cache_mb <= 0:
            raise ValueError("lowrank and rounding_iters must be >= 0, calib_rows >= 1 and cache_mb > 0")
        if (self.rounding != "rtn" or self.lowrank or self.format_search or self.rotation) and self.weight is None:
            raise ValueError("rounding, lowrank, rotation and format_search act on weights: set config.weight")
        for glob, spec in self.overrides:
            if not isinstance(glob, str) or not isinstance(spec, QuantSpec):
                raise ValueError("overrides are (module-name glob, weight QuantSpec) pairs")
            if spec.dynamic or spec.granularity == "token":
                raise ValueError(f"override {glob!r}: weights are static, per tensor, channel, group or block")

    @property
    def probs(self) -> QuantSpec | None:
        return self.attn_probs if self.attn_probs is not None else self.attn

    @property
    def learns_weights(self) -> bool:
        """Whether :func:`dmq.calibrate` changes the weights or their quantized values (so the quantized weight is
        state to save, not recomputed from the float weight)."""
        return (self.rounding != "rtn" or self.smooth is not None or self.rotation is not None or self.lowrank > 0
                or self.format_search or self.per_sample_rounding_active)

    @property
    def per_sample_spec(self) -> QuantSpec | None:
        """The weight spec of the one-token-per-sample layers, or None when they are quantized like the rest."""
        if self.per_sample is None or self.weight is None:
            return None
        if isinstance(self.per_sample, QuantSpec):
            return self.per_sample
        return _weight_only(self.weight)

    @property
    def embedding_spec(self) -> QuantSpec | None:
        """The weight spec of the ``nn.Embedding`` tables, or None when they stay in the model's dtype."""
        if self.embedding is None or self.weight is None:
            return None
        if isinstance(self.embedding, QuantSpec):
            return self.embedding
        w = self.weight
        return TABLE_SPEC if (w.fmt.element if w.fmt.is_block else w.fmt).bits < 8 else None

    @property
    def per_sample_rounding_active(self) -> bool:
        return self.per_sample_spec is not None and self.per_sample_rounding != "rtn"

    def weight_for(self, name: str) -> QuantSpec | None:
        """The weight spec of module ``name``: the first matching override, else ``weight``."""
        for glob, spec in self.overrides:
            if fnmatch.fnmatchcase(name, glob):
                return spec
        return self.weight

    def replace(self, **changes) -> QuantConfig:
        return replace(self, **changes)


def _weight_only(w: QuantSpec) -> QuantSpec:
    """The weight-only, group-wise form of weight spec ``w`` (block and group specs as they are)."""
    if w.granularity in ("block", "group"):
        return w
    return QuantSpec(w.format, "group", group_size=PER_SAMPLE_GROUP, symmetric=True,
                     estimator="mse" if w.estimator != "fp_bias" else "fp_bias")


def _int_static(bits: int, bins: int = 4) -> QuantSpec:
    return QuantSpec(f"int{bits}", "tensor", symmetric=False, estimator="mse", timestep_bins=bins)


def _w8a8() -> QuantConfig:
    """INT8 weights per output channel (symmetric, MSE clipping), INT8 activations per tensor (asymmetric uint8 with
    a zero point, static, MSE clipping from streaming histograms, 4 timestep bins), INT8 attention matmuls.
    Follows Q-Diffusion / PTQ4DM (W8A8, per-channel weights, per-tensor activations, shortcut split) with TFMQ-DM's
    per-timestep-group activation parameters."""
    return QuantConfig(
        weight=QuantSpec("int8", "channel", estimator="mse"), act=_int_static(8),
        attn=QuantSpec("int8", "tensor", estimator="mse", timestep_bins=4), attn_probs=_int_static(8), name="w8a8",
    )


def _w4a8() -> QuantConfig:
    """INT4 weights per output channel (symmetric, MSE clipping search), INT8 static per-tensor asymmetric activations
    with 4 timestep bins, INT8 attention matmuls. Q-Diffusion's W4A8 setting (without AdaRound/BRECQ) plus
    TFMQ-DM's timestep-grouped activation parameters and Q-Diffusion's shortcut split; GPTQ rounding (measured
    +5.6 dB ε SQNR over round-to-nearest on the bundled DiT, ``benchmarks/quant_keep_fp.json``)."""
    return QuantConfig(
        weight=QuantSpec("int4", "channel", estimator="mse"), act=_int_static(8),
        attn=QuantSpec("int8", "tensor", estimator="mse", timestep_bins=4), attn_probs=_int_static(8), name="w4a8",
        rounding="gptq",
    )


def _w4a16() -> QuantConfig:
    """Weight-only INT4, group-wise (32 elements of the reduction dimension per scale, symmetric, MSE clipping);
    activations and attention stay in full precision. torchao ``Int4WeightOnlyConfig`` / AWQ-style W4A16 layout
    (group 32 rather than 128 because the bundled models have 32..192 input channels), with GPTQ rounding (measured
    +5.8 dB ε SQNR over round-to-nearest on the bundled DiT, ``benchmarks/quant_keep_fp.json``)."""
    return QuantConfig(weight=QuantSpec("int4", "group", group_size=32, estimator="mse"), name="w4a16",
                       rounding="gptq")


def _w6a6() -> QuantConfig:
    """INT6 weights per output channel (MSE clipping), INT6 static per-tensor asymmetric activations with 4 timestep
    bins, INT8 attention matmuls (softmax kept at 8 bit, as Q-Diffusion's ``sm_abit``). The W6A6 point of
    ViDiT-Q / Q-DiT style INT sweeps, here with static calibrated activations."""
    return QuantConfig(
        weight=QuantSpec("int6", "channel", estimator="mse"), act=_int_static(6),
        attn=QuantSpec("int8", "tensor", estimator="mse", timestep_bins=4), attn_probs=_int_static(8), name="w6a6",
    )


def _fp8() -> QuantConfig:
    """FP8 E4M3 weights per output channel and FP8 E4M3 activations per tensor (static, max calibration, 4 timestep
    bins), E4M3 attention matmuls. NVIDIA ModelOpt's FP8 diffusion recipe (``num_bits=(4,3)``, ``--quantize-mha``),
    with per-channel weight scales."""
    e4m3 = QuantSpec("e4m3", "tensor", estimator="minmax", timestep_bins=4)
    return QuantConfig(weight=QuantSpec("e4m3", "channel"), act=e4m3, attn=e4m3, name="fp8")


def _fp_dit(act_format: str, name: str) -> QuantConfig:
    return QuantConfig(
        weight=QuantSpec("e2m1", "channel", estimator="fp_bias"),
        act=QuantSpec(act_format, "token", dynamic=True),
        attn=QuantSpec("e4m3", "token", dynamic=True), name=name,
    )


def _w4a8_fp() -> QuantConfig:
    """FP4DiT-style W4A8: E2M1 weights per output channel with an LLM-FP4 exponent-bias (scale) search, FP8 E4M3
    activations quantized online per token (per pixel for convolutions), E4M3 per-token attention operands."""
    return _fp_dit("e4m3", "w4a8-fp")


def _w4a6_fp() -> QuantConfig:
    """FP4DiT-style W4A6: E2M1 weights per output channel with an LLM-FP4 exponent-bias search, FP6 E3M2 activations
    quantized online per token (per pixel for convolutions), E4M3 per-token attention operands."""
    return _fp_dit("e3m2", "w4a6-fp")


def _mxfp4() -> QuantConfig:
    """OCP MXFP4 (E2M1 elements, blocks of 32 along the reduction dimension with an E8M0 scale) for weights and,
    dynamically, for Linear/Conv2d inputs; attention matmuls in full precision. ModelOpt ``MXFP4_DEFAULT_CFG``."""
    mx = QuantSpec("mxfp4", "block", dynamic=True)
    return QuantConfig(weight=QuantSpec("mxfp4", "block"), act=mx, name="mxfp4", rounding="gptq")


def _nvfp4() -> QuantConfig:
    """NVFP4 (E2M1 elements, blocks of 16 with an E4M3 scale, FP32 tensor scale) for weights and, dynamically, for
    Linear/Conv2d inputs; attention matmuls in full precision. ModelOpt ``NVFP4_DEFAULT_CFG`` / SVDQuant's NVFP4
    quantizer without the low-rank branch; GPTQ rounding of the E2M1 codes."""
    nv = QuantSpec("nvfp4", "block", dynamic=True)
    return QuantConfig(weight=QuantSpec("nvfp4", "block"), act=nv, name="nvfp4", rounding="gptq")


PRESETS = {
    "w8a8": _w8a8, "w4a8": _w4a8, "w4a16": _w4a16, "w6a6": _w6a6, "fp8": _fp8, "w4a8-fp": _w4a8_fp,
    "w4a6-fp": _w4a6_fp, "mxfp4": _mxfp4, "nvfp4": _nvfp4,
}


def preset_names() -> list[str]:
    return list(PRESETS)


# ``preset+variant+...``: composable method switches on top of a preset
VARIANTS = {
    "adaround": "AdaRound learned rounding (INT or FP grid), layer-wise",
    "brecq": "AdaRound with BRECQ block-output reconstruction",
    "gptq": "GPTQ Hessian error-feedback rounding",
    "rtn": "round-to-nearest weights everywhere (no learned rounding: fastest calibration)",
    "smooth": "SmoothQuant with searched alpha (``smooth0.5``: fixed alpha 0.5)",
    "svd<r>": "SVDQuant 16-bit low-rank branch of rank r (``svd32``)",
    "hadamard": "Hadamard rotation of Linear inputs",
    "rotate": "random orthogonal rotation of Linear inputs",
    "fsearch": "LLM-FP4 per-layer E/M split and exponent-bias search",
    "sdpa": "attention matmuls left in the model's dtype (fused SDPA), as optimum-quanto and torchao leave them",
    "uniform": "the one-token-per-sample layers (adaLN modulation, embedders) quantized like every other layer, "
               "activations included, instead of weight-only group-wise",
}


def _apply_variant(cfg: QuantConfig, variant: str) -> QuantConfig:
    if variant == "adaround":
        return cfg.replace(rounding="adaround")
    if variant == "brecq":
        return cfg.replace(rounding="adaround", reconstruction="block")
    if variant == "gptq":
        return cfg.replace(rounding="gptq")
    if variant == "rtn":
        return cfg.replace(rounding="rtn", per_sample_rounding="rtn")
    if variant == "hadamard":
        return cfg.replace(rotation="hadamard")
    if variant == "rotate":
        return cfg.replace(rotation="orthogonal")
    if variant == "fsearch":
        return cfg.replace(format_search=True)
    if variant == "sdpa":
        return cfg.replace(attn=None, attn_probs=None)
    if variant == "uniform":
        return cfg.replace(per_sample=None)
    m = re.fullmatch(r"smooth(\d*\.?\d*)", variant)
    if m:
        return cfg.replace(smooth=float(m.group(1)) if m.group(1) else "search")
    m = re.fullmatch(r"svd(\d+)", variant)
    if m:
        return cfg.replace(lowrank=int(m.group(1)))
    raise ValueError(f"unknown preset variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


def get_config(config: str | QuantConfig) -> QuantConfig:
    """A config object, or the preset called ``config``, optionally with ``+variant`` method switches
    (``"w4a8+adaround"``, ``"nvfp4+svd32"``, ``"w4a8+smooth+gptq"``; see :data:`VARIANTS`). Unknown names raise
    ``ValueError`` listing the presets (or variants)."""
    if isinstance(config, QuantConfig):
        return config
    if not isinstance(config, str):
        raise TypeError(f"config must be a QuantConfig or a preset name ({', '.join(PRESETS)}), got "
                        f"{type(config).__name__}")
    base, *variants = config.lower().split("+")
    try:
        cfg = PRESETS[base]()
    except KeyError:
        raise ValueError(f"unknown preset {config!r}; valid presets: {', '.join(PRESETS)}") from None
    for v in variants:
        cfg = _apply_variant(cfg, v)
    return cfg.replace(name=config.lower()) if variants else cfg


# ------------------------------------------------------------------------------------------------ JSON
_POLICIES = {"AllSteps": AllSteps, "UniformSteps": UniformSteps, "NormalSteps": NormalSteps}


def _spec_dict(spec: QuantSpec | None) -> dict | None:
    return None if spec is None else dataclasses.asdict(spec)


def config_to_dict(cfg: QuantConfig) -> dict:
    """A JSON-ready dict of ``cfg`` (round-trips through :func:`config_from_dict`)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, QuantSpec):
            v = _spec_dict(v)
        elif f.name == "steps":
            if type(v).__name__ not in _POLICIES:
                raise ValueError(f"step policy {type(v).__name__} is not serialisable; use one of {list(_POLICIES)}")
            v = {"policy": type(v).__name__, **{k.name: getattr(v, k.name) for k in dataclasses.fields(v)
                                                if not k.name.startswith("_")}}
        elif f.name == "overrides":
            v = [[g, _spec_dict(s)] for g, s in v]
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def config_from_dict(d: dict) -> QuantConfig:
    """Inverse of :func:`config_to_dict`."""
    kw = dict(d)
    for k in ("weight", "act", "attn", "attn_probs", "per_sample", "embedding"):
        if isinstance(kw.get(k), dict):
            kw[k] = QuantSpec(**kw[k])
    if "steps" in kw:
        st = dict(kw["steps"])
        kw["steps"] = _POLICIES[st.pop("policy")](**st)
    kw["keep_fp"] = tuple(kw.get("keep_fp", DEFAULT_KEEP_FP))
    kw["timestep_range"] = tuple(kw.get("timestep_range", (0.0, 1000.0)))
    kw["overrides"] = tuple((g, QuantSpec(**s)) for g, s in kw.get("overrides", ()))
    return QuantConfig(**kw)


def config_to_json(cfg: QuantConfig) -> str:
    return json.dumps(config_to_dict(cfg), indent=1)


def config_from_json(text: str) -> QuantConfig:
    return config_from_dict(json.loads(text))
