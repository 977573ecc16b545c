"""Quantized modules: Linear, Conv2d (with Q-Diffusion's shortcut split) and the attention-matmul processor.

The modules subclass ``nn.Linear`` / ``nn.Conv2d`` and keep the original ``weight`` parameter, so that
:func:`dmq.restore` can give the float module back; the fake-quantized weight lives in a non-persistent buffer
``weight_fq``. During calibration (``CONTEXT.calibrating``) they run the float weight and pass activations through,
so a calibration loop follows the full-precision trajectory.

:meth:`PackedMixin.pack` (called by ``dmq.freeze``) replaces both by a :class:`~dmq.packed_weight.PackedWeight`
``weight``: the layer is still an ``nn.Linear`` / ``nn.Conv2d`` with a ``.weight`` (peft, accelerate and model code
keep working), and runs :meth:`QuantLinear.frozen_forward`, an integer or FP8 GEMM where the formats allow
(:mod:`dmq.kernels`), else its weight dequantized on the fly, layer by layer, bit-identical to ``weight_fq``.
"""

from __future__ import annotations

import logging
import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from dmq import kernels
from dmq.calibration import CONTEXT
from dmq.config import QuantConfig, QuantSpec
from dmq.held_weight import dense, held
from dmq.packed import WeightLayout
from dmq.packed_weight import PackedWeight, dequantize, weight_part
from dmq.quantizer import TensorQuantizer

logger = logging.getLogger(__name__)


def _act(spec: QuantSpec | None, dim: int, config: QuantConfig) -> TensorQuantizer | None:
    return None if spec is None else TensorQuantizer(spec, dim, config.timestep_range)


def _register_method_state(q: nn.Module, config: QuantConfig, down_tail: tuple[int, ...], out: int,
                           rotate_dim: int | None) -> None:
    """Placeholders for the artefacts :func:`dmq.calibrate` learns (see :mod:`dmq.rounding`, :mod:`dmq.transforms`):
    a persistent ``weight_fq`` (the learned quantized weight is state, never recomputed by round-to-nearest), an
    input ``rotation`` and a 16-bit low-rank branch ``lowrank_up @ lowrank_down``. They exist from
    :func:`dmq.quantize` on, so that a freshly quantized model can ``load_state_dict`` a calibrated one."""
    q.weight_spec = config.weight
    if config.learns_weights:
        q._non_persistent_buffers_set.discard("weight_fq")
    rank = min(config.lowrank, math.prod(down_tail), out) if config.weight is not None else 0
    if getattr(q, "groups", 1) != 1:
        rank = 0  # the branch is a dense conv pair
    w = q.weight
    q.register_buffer("lowrank_down", w.new_zeros((rank, *down_tail)) if rank else None)
    q.register_buffer("lowrank_up", w.new_zeros(out, rank) if rank else None)
    use_rot = config.rotation is not None and config.weight is not None and rotate_dim is not None
    q.register_buffer("rotation", torch.eye(rotate_dim, dtype=w.dtype, device=w.device) if use_rot else None)



def _register_empty_method_state(q: nn.Module) -> None:
    """The method-state slots of :func:`_register_method_state`, empty; loading fills the ones a checkpoint has."""
    for name in ("lowrank_down", "lowrank_up", "rotation"):
        q.register_buffer(name, None)


class PackedMixin:
    """The packed state of a frozen quantized layer: its ``weight`` parameter becomes a
    :class:`~dmq.packed_weight.PackedWeight` (codes and scales described by ``weight_layouts``), so the layer stays
    an ``nn.Linear`` / ``nn.Conv2d`` with a ``.weight`` whose shape, dtype and device are the float weight's. The
    state dict holds the packed tensors under their own names (``qweight``, ``weight_scale``, ..., ``_1`` for the
    second half of a split convolution) and dtypes. ``model.to(dtype)`` / ``.half()`` / ``.float()`` raise
    ``ValueError`` before changing anything; moves across devices work."""

    weight_spec: QuantSpec | None = None
    exec_path = "dequant"
    _act_only_frozen = False  # activation-only layer, frozen: its float weight is the weight

    @property
    def weight_fq(self) -> torch.Tensor:
        """The fake-quantized weight the layer computes with until :func:`dmq.freeze`: round-to-nearest of the
        float weight, packed (:func:`dmq.held_weight.held`), built on first use. :func:`dmq.quantize` leaves the
        buffer empty (``None``): calibration runs the float weights, learned rounding replaces the buffer, and
        freeze packs layer by layer, so a model that is only quantized, calibrated and frozen never holds the
        quantized weights of all layers beside the float ones (docs/memory.md)."""
        bufs = self.__dict__["_buffers"]
        if "weight_fq" not in bufs:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'weight_fq'")
        fq = bufs["weight_fq"]
        if fq is None:
            fq = held(self.weight, self.weight_spec, getattr(self, "split", None))
            if self.weight.device.type != "meta":  # offloaded: built again from the weight each call brings
                bufs["weight_fq"] = fq
        return fq

    @property
    def packed(self) -> bool:
        return self._act_only_frozen or isinstance(self._parameters.get("weight"), PackedWeight)

    @property
    def weight_layouts(self) -> tuple[WeightLayout, ...] | None:
        w = self._parameters.get("weight")
        if isinstance(w, PackedWeight):
            return w.layouts
        return () if self._act_only_frozen else None

    def _apply(self, fn, recurse=True):
        w = self._parameters.get("weight")
        if isinstance(w, PackedWeight):
            try:
                probe = fn(torch.empty(0, dtype=w.dtype))
            except Exception:  # noqa: BLE001 -- the real call reports it
                probe = None
            if isinstance(probe, torch.Tensor) and probe.dtype != w.dtype:
                raise ValueError(f"{type(self).__name__} holds a dmq-quantized weight stored packed ({w!r}): it "
                                 f"cannot be cast to {probe.dtype}; move it with .to(device), or dequantize the "
                                 "model first (model.dequantize() / dmq.dequantize)")
        return super()._apply(fn, recurse)

    def register_parameter(self, name, param):
        super().register_parameter(name, param)
        if name == "weight" and isinstance(param, PackedWeight):
            param._owner = weakref.ref(self)  # in-place adds into it (peft's merge) come to fuse_weight_delta

    # ------------------------------------------------------------------------------- fused LoRA deltas
    def fuse_weight_delta(self, delta: torch.Tensor) -> None:
        """``W += delta`` for a packed layer: the packed codes stay as they are and ``delta`` joins the 16-bit
        ``lora_fused`` side branch (``y = Q(W) x + lora_fused x``). Each delta is kept apart, so that
        :meth:`unfuse_weight_delta` of the same delta removes it exactly."""
        w = self.weight
        if tuple(delta.shape) != tuple(w.shape):
            raise ValueError(f"fused delta: shape {tuple(delta.shape)} does not match the weight {tuple(w.shape)}")
        if not torch.isfinite(delta).all():
            raise ValueError("fused delta: it holds NaN or inf values; the layer is left unchanged")
        self._fused_parts().append(delta.detach().to(device=w.device, dtype=w.dtype))
        self._refresh_fused()

    def unfuse_weight_delta(self, delta: torch.Tensor) -> None:
        """``W -= delta``: drops a fused delta equal to ``delta`` (bit-exact restore once all are gone); a delta that
        was never fused here (a fused model loaded from disk) is subtracted from the branch."""
        w = self.weight
        delta = delta.detach().to(device=w.device, dtype=w.dtype)
        parts = self._fused_parts()
        for i in reversed(range(len(parts))):
            if torch.equal(parts[i], delta):
                del parts[i]
                break
        else:
            if tuple(delta.shape) != tuple(w.shape):
                raise ValueError(f"fused delta: shape {tuple(delta.shape)} does not match the weight "
                                 f"{tuple(w.shape)}")
            parts.append(-delta)
        self._refresh_fused()

    def _fused_parts(self) -> list[torch.Tensor]:
        return self.__dict__.setdefault("_lora_fused_parts", [])

    def _refresh_fused(self) -> None:
        parts = self._fused_parts()
        self._buffers.pop("lora_fused", None)  # no branch, no key: the state of a never-fused layer
        if parts:
            total = parts[0].clone()
            for p in parts[1:]:
                total += p
            self.register_buffer("lora_fused", total)

    def fused_branch(self, x: torch.Tensor) -> torch.Tensor | float:
        """``delta x`` of the fused LoRA deltas on the layer's own input, or 0."""
        d = self._buffers.get("lora_fused")
        if d is None:
            return 0.0
        d = d.to(x.dtype)
        return F.linear(x, d) if isinstance(self, nn.Linear) else self._conv_forward(x, d, None)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._buffers.get("weight_fq", 0) is None and "weight_fq" not in self._non_persistent_buffers_set:
            self.weight_fq  # noqa: B018 -- a persistent weight_fq not built yet is state all the same: build it
        super()._save_to_state_dict(destination, prefix, keep_vars)
        w = self._parameters.get("weight")
        if isinstance(w, PackedWeight):
            destination.pop(prefix + "weight", None)
            for n, t in w.tensors().items():
                destination[prefix + n] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        fq_key = prefix + "weight_fq"
        relink = fq_key in state_dict and "weight_fq" in self._buffers and \
            "weight_fq" not in self._non_persistent_buffers_set
        if relink:  # load a learned weight_fq into a fresh dense buffer (a held one may be packed, alias the
            w = self.weight  # weight or not be built yet), then hold it as quantize does, against the loaded weights
            self._buffers["weight_fq"] = torch.empty(w.shape, dtype=w.dtype, device=w.device)
            state_dict = {**state_dict, fq_key: dense(state_dict[fq_key])}
        w = self._parameters.get("weight")
        if isinstance(w, PackedWeight) and prefix + "lora_fused" in state_dict and "lora_fused" not in self._buffers:
            self.register_buffer("lora_fused", torch.empty(w.shape, dtype=w.dtype, device=w.device))  # saved fused
            self.__dict__["_lora_fused_parts"] = [self.lora_fused]
        if isinstance(w, PackedWeight):
            state_dict = dict(state_dict)
            have = {n: state_dict.pop(prefix + n) for n in w._names if prefix + n in state_dict}
            if len(have) == len(w._names):
                for n, t in w.tensors().items():
                    got = have[n]
                    if tuple(got.shape) != tuple(t.shape) or got.dtype != t.dtype:
                        error_msgs.append(f"packed tensor {prefix + n}: {got.dtype} {tuple(got.shape)} in the state "
                                          f"dict, the layout needs {t.dtype} {tuple(t.shape)}")
                        return
                state_dict[prefix + "weight"] = PackedWeight(have, w.layouts, w.dtype)
            else:
                missing_keys.extend(prefix + n for n in w._names if n not in have)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if relink and "weight_fq" in self._buffers and not self.packed:
            from dmq.rounding.layer import set_weight_fq

            set_weight_fq(self, self.weight_fq)
        kernels.forget(self)

    def _part(self, i: int) -> dict[str, torch.Tensor]:
        """The packed tensors of part ``i`` by their base names (``qweight``, ``weight_scale``, ...)."""
        return weight_part(self.weight, i)

    def pack(self, prepare: bool = True) -> None:
        """Replace the float ``weight`` and ``weight_fq`` by a packed weight (exactly ``weight_fq``);
        ``prepare=False`` leaves the kernel state to the caller (:func:`dmq.kernels.prepare`)."""
        if self.packed:
            return
        if self.weight_spec is not None:
            fq = self.weight_fq
            if not isinstance(fq, PackedWeight):  # held unpacked (off its grid until now, or loaded): pack it
                from dmq.rounding.layer import target_weight  # the float weight the scales were searched on

                w = target_weight(self).reshape(self.weight.shape)  # after rotation, minus the low-rank branch
                fq = held(w, self.weight_spec, getattr(self, "split", None), fq)
                if not isinstance(fq, PackedWeight):
                    raise ValueError(f"the quantized weight is not on the {self.weight_spec.format} grid of its "
                                     "scales: cannot pack it exactly")
            self.weight = nn.Parameter(fq, requires_grad=False)  # the codes weight_fq already holds: no copy
        else:  # activation-only: the float weight is the weight
            self._act_only_frozen = True
        del self.weight_fq
        self._setup_exec(prepare)

    def set_packed(self, layouts: list[WeightLayout], tensors: dict[str, torch.Tensor] | None = None,
                   device: torch.device | str | None = None) -> None:
        """Turn an unpacked skeleton into a packed layer with empty (on ``device``) or given tensors (loading)."""
        if "weight_fq" in self._buffers:
            del self.weight_fq
        if not layouts:
            self._act_only_frozen = True
            return
        layouts = tuple(layouts)
        if tensors is None:
            tensors = {}
            for i, lay in enumerate(layouts):
                for k, (shape, dtype) in lay.expected().items():
                    tensors[k if i == 0 else f"{k}_{i}"] = torch.empty(shape, dtype=dtype, device=device)
        self.weight = nn.Parameter(PackedWeight(tensors, layouts), requires_grad=False)

    def _setup_exec(self, prepare: bool = True) -> None:
        """Pick the execution path of the frozen layer and build its kernel state (:func:`dmq.kernels.prepare`;
        ``prepare=False``: later, see :func:`dmq.freeze`); called after packing and after loading."""
        self.exec_path = "dequant"
        lays = self.weight_layouts or ()
        q = getattr(self, "input_quantizer", None)
        if isinstance(self, nn.Linear) and len(lays) == 1 and q is not None and not q.spec.dynamic:
            self._pick_int_path(lays[0], q)
        if isinstance(self, nn.Linear) and prepare:
            kernels.prepare(self)

    def _pick_int_path(self, lay: WeightLayout, q: TensorQuantizer) -> None:
        if kernels.int_act_ok(lay, q):
            self.exec_path = "int_gemm"
        elif lay.storage == "float8_e4m3fn" and lay.granularity in ("channel", "tensor") and q.fmt.name == "e4m3":
            self.exec_path = "fp8_gemm"

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the layer computes with: ``weight_fq`` bit for bit (its dtype unless ``dtype`` is given)."""
        w = self._parameters.get("weight")
        if isinstance(w, PackedWeight):
            return dequantize(w, dtype)
        if not self.packed:
            return dense(self.weight_fq, dtype)
        return self.weight if dtype is None else self.weight.to(dtype)


class QuantLinear(PackedMixin, nn.Linear):
    """``y = Q_a(x) Q_w(W)^T + b``."""

    @classmethod
    def from_float(cls, mod: nn.Linear, config: QuantConfig) -> QuantLinear:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = mod.in_features, mod.out_features
        q.weight, q.bias = mod.weight, mod.bias
        q.weight_spec = config.weight
        q.input_quantizer = _act(config.act, -1, config)
        q.register_buffer("weight_fq", None, persistent=False)  # built on first use: weight_fq
        _register_method_state(q, config, (mod.in_features,), mod.out_features, mod.in_features)
        return q

    @classmethod
    def from_packed(cls, mod: nn.Linear, weight_spec: QuantSpec | None, act: TensorQuantizer | None,
                    layouts: list[WeightLayout], device: torch.device | str | None = None) -> QuantLinear:
        """A packed layer with empty tensors shaped by ``layouts`` (on ``device``, default: the float weight's), to
        load a saved state into (:func:`dmq.load`, ``from_pretrained``)."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.in_features, q.out_features = mod.in_features, mod.out_features
        q.weight, q.bias = mod.weight, mod.bias
        q.weight_spec = weight_spec
        q.input_quantizer = act
        _register_empty_method_state(q)
        q.set_packed(layouts, device=mod.weight.device if device is None else device)
        return q

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The execution of a packed layer, in one place: an input transform, a low-rank branch or fused LoRA
        deltas (:meth:`fuse_weight_delta`, on the untransformed input, as the LoRA sees it) go here; the quantized
        matmul is :func:`dmq.kernels.frozen_linear` (integer / FP8 / fused weight-only GEMMs, with the fake-quant
        computation as the fallback of every path)."""
        fused = self.fused_branch(x)
        x = self.transform_input(x)  # online rotation (identity without one)
        branch = self.lowrank_branch(x)  # 16-bit low-rank branch on the unquantized input (0.0 without one)
        y = kernels.frozen_linear(self, x)
        return _plus(_plus(y, branch), fused)

    def effective_weight(self) -> torch.Tensor:
        """The float weight the quantized path approximates: ``W R`` under an input rotation ``R``."""
        w = self.weight
        return w if self.rotation is None else w @ self.rotation

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x R`` (online input rotation; identity without one)."""
        return x if self.rotation is None else x @ self.rotation

    def lowrank_branch(self, x: torch.Tensor) -> torch.Tensor | float:
        """``x Vᵀ Uᵀ``: the 16-bit low-rank branch on the unquantized (transformed) input, or 0."""
        if self.lowrank_down is None:
            return 0.0
        return F.linear(F.linear(x, self.lowrank_down), self.lowrank_up)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Linear's argument name: model code passes input=
        x = input
        if self.packed:
            if CONTEXT.calibrating:
                raise RuntimeError("a packed (frozen) layer cannot be calibrated")
            return self.frozen_forward(x)
        if CONTEXT.calibrating:
            if self.input_quantizer is not None:
                self.input_quantizer(self.transform_input(x))
            return F.linear(x, self.weight, self.bias)
        x = self.transform_input(x)
        branch = self.lowrank_branch(x)
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.weight_fq, self.bias) + branch

    def to_float(self) -> nn.Linear:
        m = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        m.weight, m.bias = _float_weight(self), self.bias
        return m


def _plus(y: torch.Tensor, branch: torch.Tensor | float) -> torch.Tensor:
    """``y + branch``, without a pass over ``y`` for an absent (``0.0``) branch."""
    return y if isinstance(branch, float) and branch == 0.0 else y + branch


def _float_weight(mod: PackedMixin) -> nn.Parameter:
    if not mod.packed or not mod.weight_layouts:
        return mod.weight
    return nn.Parameter(mod.dequantized_weight(), requires_grad=False)


class QuantConv2d(PackedMixin, nn.Conv2d):
    """``y = conv(Q_a(x), Q_w(W))``; with ``split = s`` the input channels ``[:s]`` and ``[s:]`` (the two halves of a
    U-Net skip concatenation) have their own activation quantizers and weight scales (Q-Diffusion):
    ``y = conv(Q_a1(x[:, :s]), Q_w1(W[:, :s])) + conv(Q_a2(x[:, s:]), Q_w2(W[:, s:])) + b``."""

    def __init__(self, *args, **kwargs):
        """A plain float ``nn.Conv2d``: peft builds the LoRA convolutions of a wrapped layer as
        ``type(base_layer)(...)``. Quantized layers come from :meth:`from_float` / :meth:`from_packed`."""
        super().__init__(*args, **kwargs)
        self._plain = True

    _plain = False

    @classmethod
    def from_float(cls, mod: nn.Conv2d, config: QuantConfig, split: int | None = None) -> QuantConv2d:
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(q, attr, getattr(mod, attr))
        q.weight, q.bias = mod.weight, mod.bias
        q.weight_spec = config.weight
        if split is not None and not (0 < split < mod.in_channels and mod.groups == 1):
            raise ValueError(f"shortcut split {split} needs groups == 1 and 0 < split < {mod.in_channels}")
        q.split = split
        q.input_quantizer = _act(config.act, 1, config)
        q.input_quantizer_skip = _act(config.act, 1, config) if split is not None else None
        q.register_buffer("weight_fq", None, persistent=False)  # built on first use: weight_fq
        _register_method_state(q, config, (mod.in_channels // mod.groups, *mod.kernel_size), mod.out_channels, None)
        return q

    @classmethod
    def from_packed(cls, mod: nn.Conv2d, weight_spec: QuantSpec | None, acts: list[TensorQuantizer | None],
                    layouts: list[WeightLayout], split: int | None,
                    device: torch.device | str | None = None) -> QuantConv2d:
        """A packed convolution with empty buffers shaped by ``layouts`` (:func:`dmq.load`); ``acts`` are the input
        quantizer and the skip-half quantizer."""
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(q, attr, getattr(mod, attr))
        q.weight, q.bias = mod.weight, mod.bias
        q.weight_spec, q.split = weight_spec, split
        q.input_quantizer, q.input_quantizer_skip = acts
        _register_empty_method_state(q)
        q.set_packed(layouts, device=mod.weight.device if device is None else device)
        return q

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def lowrank_branch(self, x: torch.Tensor) -> torch.Tensor | float:
        """``conv(x, V)`` then the 1x1 ``conv(·, U)``: the 16-bit low-rank branch, or 0."""
        if self.lowrank_down is None:
            return 0.0
        return F.conv2d(self._conv_forward(x, self.lowrank_down, None), self.lowrank_up[:, :, None, None])

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is None:
            return x
        if self.split is None:
            return self.input_quantizer(x)
        s = self.split
        a, b = x[:, :s], x[:, s:]
        if x.is_contiguous() and self.input_quantizer.spec.dynamic and self.input_quantizer_skip.spec.dynamic:
            a, b = a.contiguous(), b.contiguous()  # dense halves take the one-pass native quantizers (same values)
        y = torch.cat([self.input_quantizer(a), self.input_quantizer_skip(b)], dim=1)
        # the halves are strided slices, so a channel-wise quantizer hands them back channels-last: keep x's layout
        return y.contiguous() if x.is_contiguous() else y

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A packed convolution (:func:`dmq.kernels.frozen_conv`: oneDNN's int8 convolution where it applies,
        otherwise bit for bit the fake-quant path), plus the low-rank branch if there is one."""
        y = kernels.frozen_conv(self, x)
        return _plus(_plus(y, self.lowrank_branch(x)), self.fused_branch(x))

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # nn.Conv2d's argument name: model code passes input=
        x = input
        if self._plain:
            return nn.Conv2d.forward(self, x)
        if self.packed:
            if CONTEXT.calibrating:
                raise RuntimeError("a packed (frozen) layer cannot be calibrated")
            return self.frozen_forward(x)
        if CONTEXT.calibrating:
            self._quant_input(x)
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(self._quant_input(x), self.weight_fq, self.bias) + self.lowrank_branch(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", split={self.split}" if self.split is not None else "")

    def to_float(self) -> nn.Conv2d:
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                      self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        m.weight, m.bias = _float_weight(self), self.bias
        return m


# ------------------------------------------------------------------------------------------------ attention
QUANTIZABLE_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "JointAttnProcessor2_0", "SanaAttnProcessor2_0")
# processors whose norm_q / norm_k act on the whole projection, before the heads are split (Sana's cross-attention)
NORM_BEFORE_HEADS = ("SanaAttnProcessor2_0",)
LINEAR_PROCESSORS = ("SanaLinearAttnProcessor2_0",)  # ReLU linear attention: QuantLinearAttnProcessor


class AttentionQuantizers(nn.Module):
    """The operands of an attention module's two matmuls: Q·Kᵀ (``q``, ``k``) and P·V (``probs``, ``v``)."""

    def __init__(self, config: QuantConfig, original_processor: object):
        super().__init__()
        self.q = _act(config.attn, -1, config)
        self.k = _act(config.attn, -1, config)
        self.v = _act(config.attn, -1, config)
        self.probs = _act(config.probs, -1, config)
        self.original_processor = original_processor


def _maybe(quantizer: TensorQuantizer | None, x: torch.Tensor) -> torch.Tensor:
    return x if quantizer is None else quantizer(x)


def _norm_qk(attn: nn.Module, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    query = attn.norm_q(query) if attn.norm_q is not None else query
    return query, attn.norm_k(key) if attn.norm_k is not None else key


class QuantAttnProcessor:
    """diffusers attention processor (the ``AttnProcessor2_0`` computation) with explicit matmuls whose operands are
    fake-quantized by ``attn.matmul_quantizers``: ``softmax(Q(q) Q(k)^T * scale + mask)`` -> ``Q(P) Q(v)``.
    ``norm_before_heads``: apply ``norm_q`` / ``norm_k`` to the whole projection before the head split, as Sana's
    ``SanaAttnProcessor2_0`` does (``AttnProcessor2_0`` normalises each head)."""

    def __init__(self, norm_before_heads: bool = False):
        self.norm_before_heads = norm_before_heads

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        quants: AttentionQuantizers = attn.matmul_quantizers
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        if self.norm_before_heads:
            query, key = _norm_qk(attn, query, key)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if not self.norm_before_heads:
            query, key = _norm_qk(attn, query, key)

        query, key, value = _maybe(quants.q, query), _maybe(quants.k, key), _maybe(quants.v, value)
        scores = query @ key.transpose(-1, -2) * (1.0 / math.sqrt(head_dim))  # SDPA's default scale
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = _maybe(quants.probs, scores.softmax(dim=-1))
        hidden_states = probs @ value

        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class QuantLinearAttnProcessor:
    """Sana's ReLU linear attention (``SanaLinearAttnProcessor2_0``; Xie et al. 2024, Sana, eq. 1:
    ``O = φ(Q) (φ(K)ᵀ V')``, ``φ = ReLU``, ``V'`` = V with a column of ones giving the normaliser) with its operands
    fake-quantized by ``attn.matmul_quantizers``: ``Q(φ(q))``, ``Q(φ(k))``, ``Q(v)``. There is no softmax: the
    ``d x (d + 1)`` key-value state stays in fp32, as the processor computes it (``probs`` is unused)."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        quants: AttentionQuantizers = attn.matmul_quantizers
        dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key = _norm_qk(attn, attn.to_q(hidden_states), attn.to_k(context))
        value = attn.to_v(context)
        # (B, S, H*D) -> (B, H, S, D), the operand layout of the softmax processors (per-channel specs see D last)
        query, key, value = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2).float() for x in (query, key, value))
        query, key = _maybe(quants.q, torch.relu(query)), _maybe(quants.k, torch.relu(key))
        value = F.pad(_maybe(quants.v, value), (0, 1), value=1.0)  # the ones column (normaliser) is exact
        out = query @ (key.transpose(2, 3) @ value)  # (B, H, S, D + 1)
        out = out[..., :-1] / (out[..., -1:] + 1e-15)
        out = out.transpose(1, 2).flatten(2).to(dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        return out.clip(-65504, 65504) if dtype == torch.float16 else out
