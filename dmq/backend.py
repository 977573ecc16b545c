"""dmq as a diffusers quantization backend: ``quant_method="dmq"``, :class:`DmqConfig` and :class:`DmqQuantizer`.

``import dmq`` registers both with diffusers' quantizer registry, so that

- ``Model.from_pretrained(path, quantization_config=DmqConfig("w4a16"), torch_dtype=torch.bfloat16)`` quantizes on
  load with a preset that needs no calibration data (weight-only, dynamic activations), and
  ``PipelineQuantizationConfig(quant_mapping={"transformer": DmqConfig(...)})`` does the same per component;
- a model quantized, calibrated and frozen by :func:`dmq.quantize` / :func:`dmq.calibrate` / :func:`dmq.freeze` is
  saved by ``model.save_pretrained(dir)`` (safetensors, sharded with ``max_shard_size``) and loaded back by plain
  ``Model.from_pretrained(dir)`` / ``DiffusionPipeline.from_pretrained(dir)``, bit-identical, with no float weight
  ever materialised: the skeleton is built on the meta device, its quantized layers are swapped for packed ones
  from the quantization map in the checkpoint's metadata (:mod:`dmq.serialization`), and the packed tensors and
  quantizer scales are installed as each shard is read.

The checkpoint is the one dmq format: the model's state dict (packed codes and scales under ``<layer>.qweight``,
``<layer>.weight_scale``, ...) plus the JSON quantization map under the ``"dmq"`` metadata key of every shard; the
config gets ``quantization_config`` (this :class:`DmqConfig`, with the pre-quantization dtype, since diffusers does
not write ``_pre_quantization_dtype`` to ``config.json``).
"""

from __future__ import annotations

import json
import logging
import weakref
from enum import Enum
from typing import Any

import torch
from diffusers.quantizers.base import DiffusersQuantizer
from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from dmq.config import PRESETS, QuantConfig, config_from_dict, get_config
from dmq.packed import dtype_from_name, dtype_name
from dmq.packed_weight import PackedWeight
from dmq.quantizer import TensorQuantizer

logger = logging.getLogger(__name__)

QUANT_METHOD = "dmq"


class DmqMethod(str, Enum):
    """The ``quant_method`` value (a str enum, as diffusers' own methods are)."""

    DMQ = QUANT_METHOD


def needs_calibration(cfg: QuantConfig) -> list[str]:
    """What in ``cfg`` needs calibration data (empty: it can quantize on load)."""
    why = []
    for name, spec in (("act", cfg.act), ("attn", cfg.attn), ("attn_probs", cfg.probs)):
        if spec is not None and not spec.dynamic:
            why.append(f"static {name} scales")
    if cfg.learns_weights:
        why.append("learned weights (rounding, smoothing, rotation, low-rank or format search)")
    return why


def on_load_config(config: str | QuantConfig) -> QuantConfig:
    """The config a model quantizes with on load, without data: learned rounding (GPTQ / AdaRound, part of the W4
    presets) falls back to round-to-nearest, unless asked for by name (``"w4a16+gptq"``), which needs data."""
    cfg = get_config(config)
    asked = isinstance(config, str) and {"gptq", "adaround", "brecq"} & set(config.lower().split("+")[1:])
    if not asked and (cfg.rounding != "rtn" or cfg.per_sample_rounding != "rtn"):
        cfg = cfg.replace(rounding="rtn", per_sample_rounding="rtn")
    return cfg


def load_time_presets() -> list[str]:
    """The presets that quantize on load (no calibration data)."""
    return [p for p in PRESETS if not needs_calibration(on_load_config(p))]


class DmqConfig(QuantizationConfigMixin):
    """Quantization config of the dmq backend.

    Args:
        config: a preset name (``dmq.preset_names()``, variants included) or a :class:`~dmq.config.QuantConfig` (or
            its dict form, as stored in ``config.json``).
        modules_to_not_convert: module names (substrings, as in diffusers) to keep in full precision, on top of the
            config's own ``keep_fp`` globs and the model's ``_keep_in_fp32_modules``.
        pre_quantization_dtype: the dtype of the float weights (filled in when a model is quantized; saved, so that a
            reload without ``torch_dtype`` restores it).
    """

    def __init__(self, config: str | QuantConfig | dict = "w4a16", modules_to_not_convert: list[str] | None = None,
                 pre_quantization_dtype: str | torch.dtype | None = None, **kwargs):
        self.quant_method = DmqMethod.DMQ
        if isinstance(config, QuantConfig):
            from dmq.serialization import config_entry

            config = config_entry(config)
        elif isinstance(config, dict):
            try:
                config_from_dict(config)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"DmqConfig(config=...): not a valid QuantConfig dict ({e})") from None
        elif isinstance(config, str):
            get_config(config)  # ValueError naming the presets
        else:
            raise TypeError(f"DmqConfig(config=...) takes a preset name or a QuantConfig, got {type(config).__name__}")
        self.config = config
        if modules_to_not_convert is not None and (isinstance(modules_to_not_convert, str) or not all(
                isinstance(m, str) for m in modules_to_not_convert)):
            raise TypeError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        if isinstance(pre_quantization_dtype, torch.dtype):
            pre_quantization_dtype = dtype_name(pre_quantization_dtype)
        if pre_quantization_dtype is not None:
            dtype_from_name(pre_quantization_dtype)
        self.pre_quantization_dtype = pre_quantization_dtype
        kwargs.pop("quant_method", None)
        if kwargs:
            raise TypeError(f"DmqConfig got unexpected arguments {sorted(kwargs)}")

    @property
    def quant_config(self) -> QuantConfig:
        return get_config(self.config) if isinstance(self.config, str) else config_from_dict(self.config)

    @property
    def on_load_config(self) -> QuantConfig:
        """The config of quantization on load (:func:`on_load_config`)."""
        return on_load_config(self.config if isinstance(self.config, str) else self.quant_config)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "config": self.config,
                "modules_to_not_convert": self.modules_to_not_convert,
                "pre_quantization_dtype": self.pre_quantization_dtype}

    def to_diff_dict(self) -> dict[str, Any]:
        """The entries that differ from ``DmqConfig()``'s (``quant_method`` always)."""
        default = DmqConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "quant_method" or v != default[k]}

    def __repr__(self) -> str:
        return f"DmqConfig {json.dumps(self.to_dict(), sort_keys=True)}"


def _globs(names: list[str] | None) -> list[str]:
    # diffusers matches modules_to_not_convert and _keep_in_fp32_modules as substrings of the module name
    return [f"*{n}*" for n in names or ()]


class DmqQuantizer(DiffusersQuantizer):
    """The diffusers quantizer of ``quant_method="dmq"`` (see the module docstring)."""

    requires_calibration = False
    use_keep_in_fp32_modules = True

    def __init__(self, quantization_config: DmqConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.device_map = None
        self.torch_dtype = None
        self._qmap: dict | None = None
        self._model: nn.Module | None = None
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._layers: dict[str, nn.Module] = {}
        self._quantizers: set[str] = set()
        self._loaded_keys: list[str] = []
        self._owner: weakref.ref | None = None

    # ------------------------------------------------------------------------------------------ checks
    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict):
            if any(str(d) == "disk" for d in device_map.values()):
                raise ValueError("dmq-quantized models cannot be offloaded to disk (device_map value 'disk')")
            self.device_map = device_map
        if not self.pre_quantized:
            cfg = self.quantization_config.on_load_config
            why = needs_calibration(cfg)
            if why:
                raise ValueError(
                    f"DmqConfig({self.quantization_config.config!r}) needs calibration data ({', '.join(why)}): it "
                    "cannot quantize on load. Quantize, calibrate and freeze the float model with dmq, then "
                    f"save_pretrained it. Presets that quantize on load: {', '.join(load_time_presets())}")

    def update_torch_dtype(self, torch_dtype):
        if torch_dtype is None:  # the saved float dtype, else what diffusers loads without torch_dtype
            pre = self.quantization_config.pre_quantization_dtype
            torch_dtype = dtype_from_name(pre) if pre is not None else torch.float32
        self.torch_dtype = torch_dtype
        return torch_dtype

    @property
    def supports_parallel_loading(self) -> bool:
        return False  # the packed tensors of one layer are gathered across a shard's keys

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # adapters (LoRA) train through the frozen quantized layers

    @property
    def is_compileable(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------- pre-quantized load
    def maybe_update_loaded_keys(self, loaded_keys, checkpoint_files):
        if self.pre_quantized:
            from dmq.integrity import verify_sealed_parent
            from dmq.serialization import read_map

            # a folder sealed by dmq.save / save_quantized (the model's, or its pipeline's): checked whole, so an
            # edited quantization_config in config.json fails here
            verify_sealed_parent(checkpoint_files[0])
            self._qmap = read_map(checkpoint_files[0])
            self._loaded_keys = list(loaded_keys)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, device_map=None, keep_in_fp32_modules=None, **kwargs):
        self._model = model
        cfg = self.quantization_config
        self.modules_to_not_convert = list(cfg.modules_to_not_convert or []) + list(keep_in_fp32_modules or [])
        if not self.pre_quantized:
            return model
        from dmq.serialization import swap_modules

        if self._qmap is None:
            raise ValueError("this checkpoint has a dmq quantization_config but no dmq quantization map in its "
                             "safetensors metadata: it was not written by dmq (save_pretrained of a frozen model)")
        st = swap_modules(model, self._qmap, device="meta")
        model._dmq = st
        self._layers = {n: model.get_submodule(n) for n in st.modules}
        self._quantizers = {n for n, m in model.named_modules() if isinstance(m, TensorQuantizer)}
        # carried artefacts of quantized layers (low-rank branch, rotation): placeholders, so they are expected keys
        for k in self._loaded_keys:
            parent, _, leaf = k.rpartition(".")
            mod = self._layers.get(parent)
            if mod is not None and leaf not in mod._parameters and mod._buffers.get(leaf) is None and \
                    leaf not in getattr(mod._parameters.get("weight"), "_names", ()):
                mod.register_buffer(leaf, torch.empty(0, device="meta"))
        return model

    def _device(self, key: str):
        from diffusers.models.model_loading_utils import _determine_param_device

        return _determine_param_device(key, self.device_map)

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Install the packed tensors, quantizer scales and carried artefacts of the dmq modules exactly as stored
        (diffusers would cast float ones to ``torch_dtype``); the rest loads the usual way."""
        if not self.pre_quantized or self._model is None:
            return state_dict
        from dmq.serialization import check_digests

        check_digests(self._qmap, state_dict)
        rest = {}
        for k, t in state_dict.items():
            parent, _, leaf = k.rpartition(".")
            layer = self._layers.get(parent)
            if layer is not None and isinstance(layer._parameters.get("weight"), PackedWeight) and \
                    leaf in layer.weight._names:
                self._pending.setdefault(parent, {})[leaf] = t
                self._install_weight(parent, layer)
            elif layer is not None and leaf not in ("weight", "bias"):
                layer._buffers[leaf] = t.to(self._device(k))
            elif parent in self._quantizers:
                self._model.get_submodule(parent)._buffers[leaf] = t.to(self._device(k))
            else:
                rest[k] = t
        return rest

    def _install_weight(self, name: str, layer: nn.Module) -> None:
        w = layer.weight
        got = self._pending[name]
        if len(got) < len(w._names):
            return  # the rest is in a later shard
        from dmq.serialization import check_packed

        check_packed(name, got, w.layouts)
        dev = self._device(f"{name}.weight")
        dtype = self.torch_dtype if self.torch_dtype is not None else w.dtype
        tensors = {k: t.to(dev) for k, t in got.items()}
        layer.weight = nn.Parameter(PackedWeight(tensors, w.layouts, dtype), requires_grad=False)
        del self._pending[name]

    # ------------------------------------------------------------------------------------------------ saving
    def get_state_dict_and_metadata(self, state_dict, safe_serialization=False):
        """The state dict as it is (packed tensors under their own names) and the quantization map as metadata."""
        from dmq.serialization import map_metadata

        model = self._owner() if self._owner is not None else None
        if model is None:
            raise ValueError("this dmq quantizer is not attached to a model")
        return state_dict, map_metadata(model, state_dict)

    # ------------------------------------------------------------------------------------------ finishing
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            from dmq.serialization import finish_load

            if self._pending:
                name, got = next(iter(self._pending.items()))
                raise ValueError(f"the checkpoint holds only {sorted(got)} of the packed weight of {name!r}")
            finish_load(model, model._dmq)
        else:
            import dmq
            from dmq.serialization import realign

            realign(model)  # as a pre-quantized load does: both then compute on aligned weights, bit for bit alike
            cfg = self.quantization_config.on_load_config
            # the model's _keep_in_fp32_modules are kept by dmq.quantize itself, without a warning for names of
            # parameters (Wan's scale_shift_table) that match no module
            dmq.quantize(model, cfg, exclude=_globs(self.quantization_config.modules_to_not_convert))
            dmq.freeze(model)
        self._model, self._layers, self._qmap = None, {}, None
        mark_quantized(model, self)
        return model

    def _dequantize(self, model):
        import dmq

        dmq.restore(model, allow_dequantized=True)
        model.hf_quantizer = self  # diffusers deletes it next
        return model


# ------------------------------------------------------------------------------------------ attach / detach
def _weight_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def mark_quantized(model: nn.Module, quantizer: DmqQuantizer) -> None:
    """Flag a diffusers model as quantized by dmq: ``hf_quantizer``, ``is_quantized`` (diffusers then refuses dtype
    casts), and ``quantization_config`` / ``_pre_quantization_dtype`` in its config."""
    cfg = quantizer.quantization_config
    if cfg.pre_quantization_dtype is None:
        cfg.pre_quantization_dtype = dtype_name(_weight_dtype(model))
    quantizer._owner = weakref.ref(model)
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = DmqMethod.DMQ
    if hasattr(model, "register_to_config"):
        model.register_to_config(quantization_config=cfg,
                                 _pre_quantization_dtype=dtype_from_name(cfg.pre_quantization_dtype))


def attach(model: nn.Module) -> None:
    """After :func:`dmq.freeze` of a diffusers model: make it a dmq-quantized diffusers model, so that
    ``save_pretrained`` writes the dmq format and ``dequantize()`` / dtype guards work. No-op for other modules."""
    from diffusers import ModelMixin

    if not isinstance(model, ModelMixin) or getattr(model, "hf_quantizer", None) is not None:
        return
    from dmq.serialization import config_entry

    st = model._dmq
    preset = st.config.name if st.config.name in PRESETS and get_config(st.config.name) == st.config else None
    cfg = DmqConfig(preset or config_entry(st.config), pre_quantization_dtype=_weight_dtype(model))
    mark_quantized(model, DmqQuantizer(cfg, pre_quantized=True))


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (after :func:`dmq.restore`): a plain float diffusers model again."""
    if getattr(model, "quantization_method", None) != DmqMethod.DMQ:
        return
    model.is_quantized = False
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    internal = getattr(model, "_internal_dict", None)
    if internal is not None:
        from diffusers.configuration_utils import FrozenDict

        d = dict(internal)
        d.pop("quantization_config", None)
        d.pop("_pre_quantization_dtype", None)
        model._internal_dict = FrozenDict(d)


def register() -> None:
    """Register ``quant_method="dmq"`` in diffusers' quantizer registry (idempotent; ``import dmq`` calls it)."""
    from diffusers.quantizers import auto

    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DmqQuantizer
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DmqConfig
