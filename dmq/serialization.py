"""The dmq on-disk format, and ``dmq.save`` / ``dmq.load`` over it.

One format, written by ``model.save_pretrained(dir)`` of a frozen diffusers model (:mod:`dmq.backend`) and by
:func:`save`: safetensors files holding the model's whole state dict (packed codes and scales of the quantized
layers under ``<layer>.qweight``, ``<layer>.weight_scale``, ...; the float layers kept in full precision; every
quantizer's frozen scales) under the tensors' own dtypes, each with a JSON quantization map under the metadata key
``"dmq"``, written from the modules themselves:

- ``modules``: per quantized layer, its type, weight spec, packed layouts (format, granularity, group size, storage,
  scale dtype), shortcut split, its activation quantizers (spec, timestep bins, timestep range, enabled), and the
  module's ``dmq_extra_config()`` if it has one;
- ``attention``: per quantized attention module, its matmul-operand quantizers;
- ``config``: the global :class:`~dmq.config.QuantConfig` (a report: per-module entries are what load uses);
- ``model``: the class and ``config`` of a diffusers backbone, so that a single file can rebuild it;
- ``sha256``: a digest of every tensor (of all shards), so a damaged file fails loudly and names the tensor.

A file written by :func:`write_file` also carries the integrity seal of :mod:`dmq.integrity` (a digest over the map
and every tensor, so an edited header fails too) and is written atomically (temporary file, ``fsync``, rename).

A diffusers model is a folder (``config.json`` with ``quantization_config``, shards, index) that plain
``from_pretrained`` reads after ``import dmq``; :func:`save` also writes a lone ``.safetensors`` file (any module).
Tensors a module carries beyond what dmq itself knows (a low-rank branch, a rotation, registered as persistent
buffers of a quantized layer or of its quantizers) are saved with the rest and registered again on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from dmq import attention, integrity
from dmq import validation as check
from dmq.api import QuantState, _set_child
from dmq.calibration import AllSteps, TimestepHook
from dmq.config import QuantConfig, QuantSpec, config_from_dict, config_to_dict
from dmq.embedding import QuantEmbedding
from dmq.modules import AttentionQuantizers, QuantConv2d, QuantLinear
from dmq.packed import WeightLayout
from dmq.quantizer import TensorQuantizer
from dmq.transaction import transaction

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
METADATA_KEY = "dmq"
# dmq.load(path) rebuilds a backbone only from classes of these packages (a file never names arbitrary code to run)
BUILDABLE_PACKAGES = ("diffusers.",)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------------ the JSON map
def _spec(s: QuantSpec | None) -> dict | None:
    return None if s is None else dataclasses.asdict(s)


def _spec_from(d: dict | None, where: str) -> QuantSpec | None:
    if d is None:
        return None
    try:
        return QuantSpec(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad quantizer spec {d!r}: {e}") from None


def _quantizer(q: TensorQuantizer | None) -> dict | None:
    if q is None:
        return None
    return {"spec": _spec(q.spec), "num_bins": q.num_bins, "timestep_range": list(q.timestep_range),
            "channel_dim": q.channel_dim, "enabled": q.enabled}


def _quantizer_from(d: dict | None, where: str) -> TensorQuantizer | None:
    if d is None:
        return None
    spec = _spec_from(d.get("spec"), where)
    try:
        q = TensorQuantizer(spec, int(d["channel_dim"]), tuple(float(v) for v in d["timestep_range"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: bad quantizer entry {d!r}: {e}") from None
    if q.num_bins != d.get("num_bins", q.num_bins):
        raise ValueError(f"{where}: {d.get('num_bins')} timestep bins in the map, the spec gives {q.num_bins}")
    q.enabled = bool(d.get("enabled", True))
    q.observer, q.frozen = None, True
    return q


def config_entry(cfg: QuantConfig) -> dict:
    """The JSON form of ``cfg`` (a custom step policy, irrelevant once frozen, becomes ``AllSteps``)."""
    return _config(cfg)


def _config(cfg: QuantConfig) -> dict:
    try:
        return config_to_dict(cfg)
    except ValueError:  # a custom step policy: irrelevant once frozen
        return config_to_dict(cfg.replace(steps=AllSteps()))


def _config_from(d: dict) -> QuantConfig:
    try:
        return config_from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"bad config entry in the quantization map: {e}") from None


def _model_entry(model: nn.Module) -> dict | None:
    cls = type(model)
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cls, "from_config") or not cls.__module__.startswith(BUILDABLE_PACKAGES):
        return None
    plain = {k: v for k, v in dict(cfg).items()
             if k not in ("quantization_config", "_pre_quantization_dtype", "_name_or_path")}
    return {"class": f"{cls.__module__}:{cls.__qualname__}",
            "config": json.loads(json.dumps(plain, default=lambda v: list(v) if isinstance(v, (set, frozenset)) else
                                            str(v)))}


def quantization_map(model: nn.Module) -> dict:
    """The JSON map :func:`save` writes: per-module formats, layouts, quantizers and timestep bins."""
    st = _frozen_state(model)
    modules = {}
    for name in st.modules:
        mod = model.get_submodule(name)
        entry = {"type": type(mod).__name__, "weight_spec": _spec(mod.weight_spec),
                 "layouts": [lay.to_dict() for lay in mod.weight_layouts or ()],
                 "split": getattr(mod, "split", None),
                 "quantizers": {n: _quantizer(c) for n, c in mod.named_children() if isinstance(c, TensorQuantizer)}}
        if hasattr(mod, "dmq_extra_config"):
            entry["extra"] = mod.dmq_extra_config()
        modules[name] = entry
    attention = {}
    for name in st.attention:
        mq = model.get_submodule(name).matmul_quantizers
        attention[name] = {"quantizers": {k: _quantizer(getattr(mq, k)) for k in ("q", "k", "v", "probs")}}
    return {"format_version": FORMAT_VERSION, "config": _config(st.config), "modules": modules,
            "attention": attention, "splits": dict(st.splits), "model": _model_entry(model)}


def _frozen_state(model: nn.Module) -> QuantState:
    st = getattr(model, "_dmq", None)
    if st is None:
        raise ValueError("model is not quantized: dmq.quantize, dmq.calibrate and dmq.freeze it before dmq.save")
    if not (st.frozen and st.packed):
        raise ValueError("dmq.save needs a packed model: call dmq.freeze(model) (with pack=True) first")
    return st


# --------------------------------------------------------------------------------------------------- save
def _digest(t: torch.Tensor) -> str:
    b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(memoryview(b.numpy()) if b.numel() else b"").hexdigest()


def _cpu_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:  # tied tensors: safetensors stores each storage once
            v = v.clone()
        seen.add(key)
        tensors[k] = v
    return tensors


def map_metadata(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata of every file of ``model``'s checkpoint: the quantization map with the digest of
    every tensor of ``state_dict``."""
    qmap = quantization_map(model)
    qmap["sha256"] = {k: _digest(v) for k, v in state_dict.items()}
    return {METADATA_KEY: json.dumps(qmap)}


def write_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | os.PathLike) -> None:
    """Write one safetensors file of the format (the single place dmq itself writes one)."""
    from safetensors.torch import save_file

    sealed = integrity.seal({"format": "pt", **metadata}, tensors)

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=sealed)
        integrity.canonical_header(tmp)

    integrity.atomic_write(path, write)


def save(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int | str | None = None) -> None:
    """Write a frozen (packed) quantized model.

    ``path`` ending in ``.safetensors``: one file (any module). Otherwise a folder: a diffusers model is written by
    its own ``save_pretrained`` (``config.json`` with ``quantization_config``, sharded by ``max_shard_size``), which
    plain ``from_pretrained`` loads after ``import dmq``; another module gets ``diffusion_pytorch_model.safetensors``
    in the folder. Same tensors and map either way.
    """
    path = Path(check.path("path", path))
    _frozen_state(model)
    if path.suffix == ".safetensors":
        integrity.check_target(path)
        _write_model_file(model, path)
        return
    diffusers_model = hasattr(model, "save_pretrained") and hasattr(model, "register_to_config")
    if max_shard_size is not None and not diffusers_model:
        raise ValueError("max_shard_size shards a diffusers model's folder; this writes one file")
    # a folder is filled under a temporary name, sealed (a digest of every file, config.json included) and swapped in
    with integrity.atomic_directory(path) as tmp:
        if diffusers_model:
            from dmq.backend import attach

            attach(model)
            kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model.save_pretrained(tmp, safe_serialization=True, **kwargs)
        else:
            _write_model_file(model, tmp / WEIGHTS_NAME)
    logger.info("dmq.save: sealed folder %s written", path)


def _write_model_file(model: nn.Module, path: Path) -> None:
    tensors = _cpu_tensors(model)
    write_file(tensors, map_metadata(model, tensors), path)
    logger.info("dmq.save: %d tensors, %d bytes, to %s", len(tensors), os.path.getsize(path), path)


# --------------------------------------------------------------------------------------------------- load
def read_map(path: str | os.PathLike) -> dict:
    """The quantization map of one file of the format (its header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if METADATA_KEY not in meta:
        raise ValueError(f"{path}: no '{METADATA_KEY}' quantization map in the metadata: not written by dmq")
    try:
        qmap = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the quantization map is not valid JSON ({e})") from None
    if qmap.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: quantization map version {qmap.get('format_version')!r}, this dmq reads "
                         f"{FORMAT_VERSION}")
    return qmap


def check_digests(qmap: dict, tensors: dict[str, torch.Tensor], where: object = "checkpoint", *,
                  complete: bool = False) -> None:
    """Every tensor against its digest in the map; ``complete``: the tensors are the whole checkpoint."""
    digests = qmap.get("sha256", {})
    extra = sorted(set(tensors) - set(digests))
    if extra:
        raise ValueError(f"{where}: tensor {extra[0]!r} is not in the map")
    if complete:
        for k in sorted(set(digests) - set(tensors)):
            raise ValueError(f"{where}: tensor {k!r} is missing from the file")
    for k, t in tensors.items():
        if _digest(t) != digests[k]:
            raise ValueError(f"{where}: tensor {k!r} does not match its sha256 digest: the file is damaged")


def check_packed(name: str, tensors: dict[str, torch.Tensor], layouts) -> None:
    """The packed tensors of layer ``name`` have the shapes and dtypes of their layouts."""
    for i, lay in enumerate(layouts):
        for base, (shape, dtype) in lay.expected().items():
            k = base if i == 0 else f"{base}_{i}"
            t = tensors[k]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"tensor {name}.{k!r} is {t.dtype} {tuple(t.shape)}, its layout needs {dtype} "
                                 f"{tuple(shape)}")


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors files in the folder")
        return files
    return [path]


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The quantization map and the tensors of a file (or a folder of shards) of the format, checked against their
    digests."""
    from safetensors import SafetensorError, safe_open

    source = Path(path)
    if not source.exists():
        raise ValueError(f"{str(source)!r} does not exist")
    files = _files(source)
    qmap = read_map(files[0])
    tensors = {}
    for f in files:
        try:
            with safe_open(os.fspath(f), framework="pt") as h:
                meta = h.metadata() or {}
                # a lone file must carry the seal (it covers the map); shards written by save_pretrained may not
                table = integrity.verify_metadata(meta, h.keys(), f) \
                    if integrity.SEAL_KEY in meta or not source.is_dir() else None
                part = {k: h.get_tensor(k) for k in h.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        if table is not None:
            integrity.verify_tensors(table, part, f)
        tensors.update(part)
    check_digests(qmap, tensors, path, complete=True)
    return qmap, tensors


def import_class(ref: str, packages: tuple[str, ...]) -> type:
    """The class ``"module:Qualified.Name"``, only from modules under ``packages`` (a file never picks code to run)."""
    mod_name, _, qual = ref.partition(":")
    if not mod_name.startswith(packages) or not qual:
        raise ValueError(f"class {ref!r} is not in an allowed package {packages}: pass the model to dmq.load")
    try:
        obj = importlib.import_module(mod_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {ref!r}: {e}") from None
    return obj


def _from_pretrained(folder: Path) -> nn.Module:
    cfg = json.loads((folder / "config.json").read_text())  # verified by the caller
    qcfg = cfg.get("quantization_config") or {}
    if qcfg.get("quant_method") != "dmq":
        raise ValueError(f"{folder}: config.json has no dmq quantization_config: not a dmq-quantized model folder")
    import diffusers

    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"{folder}: _class_name {cfg.get('_class_name')!r} is not a diffusers model class")
    return cls.from_pretrained(folder)


def _build(entry: dict | None, path) -> nn.Module:
    if entry is None:
        raise ValueError(f"{path}: the saved model is not a diffusers backbone that can be rebuilt from its config; "
                         "pass a model of the same architecture: dmq.load(model, path)")
    cls = import_class(entry["class"], BUILDABLE_PACKAGES)
    try:
        from accelerate import init_empty_weights
        ctx = init_empty_weights(include_buffers=False)  # parameters on meta: the loaded tensors replace them
    except ImportError:
        ctx = nullcontext()
    with ctx:
        model = cls.from_config(entry["config"])
    return model.eval()


def swap_modules(model: nn.Module, qmap: dict, device: torch.device | str | None = None) -> QuantState:
    """Swap the layers and attention modules the map names for packed skeletons (their tensors empty, on
    ``device``, default: where each float weight is)."""
    cfg = _config_from(qmap["config"])
    st = QuantState(cfg, None, frozen=True, packed=True, splits={k: int(v) for k, v in qmap.get("splits", {}).items()})
    for name, e in qmap["modules"].items():
        where = f"module {name!r}"
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where} of the checkpoint is not in the model") from None
        wspec = _spec_from(e.get("weight_spec"), where)
        try:
            layouts = [WeightLayout.from_dict(d) for d in e.get("layouts", [])]
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        qs = e.get("quantizers", {})
        kind = e.get("type")
        if kind == "QuantLinear" and type(mod) is nn.Linear:
            shape = (mod.out_features, mod.in_features)
            new = QuantLinear.from_packed(mod, wspec, _quantizer_from(qs.get("input_quantizer"), where), layouts,
                                          device)
        elif kind == "QuantEmbedding" and type(mod) is nn.Embedding:
            shape = tuple(mod.weight.shape)
            new = QuantEmbedding.from_packed(mod, wspec, layouts, device)
        elif kind == "QuantConv2d" and type(mod) is nn.Conv2d:
            shape = tuple(mod.weight.shape)
            split = e.get("split")
            acts = [_quantizer_from(qs.get(n), where) for n in ("input_quantizer", "input_quantizer_skip")]
            new = QuantConv2d.from_packed(mod, wspec, acts, layouts, split, device)
        else:
            raise ValueError(f"{where}: the checkpoint has a {kind}, the model a {type(mod).__name__}")
        got = _joined_shape(layouts, getattr(new, "split", None))
        if layouts and got != shape:
            raise ValueError(f"{where}: packed weight shape {got} does not match the model's {shape}")
        if hasattr(new, "dmq_set_extra_config") and "extra" in e:
            new.dmq_set_extra_config(e["extra"])
        _set_child(model, name, new)
        st.modules.append(name)
    for name, e in qmap.get("attention", {}).items():
        where = f"attention {name!r}"
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{where} of the checkpoint is not in the model") from None
        proc = getattr(mod, "processor", None)
        if attention.kind(proc) is None:
            raise ValueError(f"{where}: the model's attention processor {type(proc).__name__} is not quantizable")
        mq = AttentionQuantizers.__new__(AttentionQuantizers)
        nn.Module.__init__(mq)
        for k in ("q", "k", "v", "probs"):
            setattr(mq, k, _quantizer_from(e["quantizers"].get(k), f"{where}.{k}"))
        attention.attach(mod, mq)  # as dmq.quantize does
        st.attention.append(name)
    return st


def _joined_shape(layouts: list[WeightLayout], split: int | None) -> tuple[int, ...]:
    if len(layouts) == 1:
        return layouts[0].shape
    a, b = layouts[0].shape, layouts[1].shape
    return (a[0], a[1] + b[1], *a[2:])


def _owner(key: str, prefixes: list[str]) -> str | None:
    """The quantized module (or attention module) whose subtree holds state-dict ``key``."""
    best = None
    for p in prefixes:
        if key.startswith(p + ".") and (best is None or len(p) > len(best)):
            best = p
    return best


def _load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], st: QuantState, path) -> None:
    expected = model.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) of the model, e.g. {missing[:5]}")
    owners = st.modules + st.attention
    for k in sorted(set(tensors) - set(expected)):
        if _owner(k, owners) is None:
            raise ValueError(f"{path}: tensor {k!r} belongs to no module of the model")
        parent, _, leaf = k.rpartition(".")
        try:
            sub = model.get_submodule(parent)
        except AttributeError:
            raise ValueError(f"{path}: tensor {k!r}: the model has no module {parent!r}") from None
        sub.register_buffer(leaf, tensors[k])  # an extra artefact of a quantized layer: carried as a buffer
    packed = {}
    for name in st.modules:
        mod = model.get_submodule(name)
        for i, lay in enumerate(mod.weight_layouts or ()):
            for base, (shape, dtype) in lay.expected().items():
                packed[f"{name}.{base}{'' if i == 0 else f'_{i}'}"] = (shape, dtype)
    expected = model.state_dict(keep_vars=True)
    for k, ref in expected.items():
        t = tensors[k]
        if k in packed:
            shape, dtype = packed[k]
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{path}: tensor {k!r} is {t.dtype} {tuple(t.shape)}, its layout needs {dtype} "
                                 f"{tuple(shape)}")
        elif ref.numel() and tuple(t.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(t.shape)}, the model needs {tuple(ref.shape)}")
        elif ref.is_floating_point() != t.is_floating_point():
            raise ValueError(f"{path}: tensor {k!r} is {t.dtype}, the model holds {ref.dtype}")
    model.load_state_dict(tensors, strict=True, assign=True)


def load(model_or_path: nn.Module | str | os.PathLike, path: str | os.PathLike | None = None) -> nn.Module:
    """Load a model written by :func:`save` or by ``save_pretrained`` of a dmq-quantized diffusers model.

    ``dmq.load(path)`` rebuilds a diffusers backbone (a folder: its ``from_pretrained``; a file: the class and
    config in the map; no float weights, no hub); ``dmq.load(model, path)`` quantizes the structure of ``model`` (an
    unquantized model of the same architecture, weights irrelevant) in place and fills it. Outputs are
    bit-identical to the saved model's. A damaged, truncated or mismatched file raises ``ValueError`` naming the
    tensor or key.
    """
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        if path is None:
            raise TypeError("dmq.load(model, path): path is missing; give the checkpoint written by dmq.save")
        check.path("path", path)
        if getattr(model, "_dmq", None) is not None:
            raise ValueError("dmq.load(model, path) needs an unquantized model; dmq.restore it or build a fresh one")
    else:
        if path is not None:
            raise TypeError(f"dmq.load(model, path): model must be a torch.nn.Module, got "
                            f"{type(model_or_path).__name__}")
        model, path = None, check.path("model_or_path", model_or_path)
    if Path(path).is_dir():
        # a folder must carry the seal dmq.save writes (its own, or its pipeline's for a component): it covers
        # config.json (quantization_config) and every file
        if integrity.verify_sealed_parent(Path(path) / "config.json") is None:
            integrity.verify_folder(path)
        if model is None and (Path(path) / "config.json").exists():
            return _from_pretrained(Path(path))
    qmap, tensors = read(path)
    if model is None:
        return _fill(_build(qmap.get("model"), path), qmap, tensors, path)
    with transaction(model):
        return _fill(model, qmap, tensors, path)


def _fill(model: nn.Module, qmap: dict, tensors: dict[str, torch.Tensor], path) -> nn.Module:
    try:
        st = swap_modules(model, qmap)
    except (KeyError, TypeError, AttributeError) as e:  # a map of an unexpected shape
        raise ValueError(f"{path}: the quantization map is malformed ({type(e).__name__}: {e})") from None
    _load_tensors(model, tensors, st, path)
    finish_load(model, st)
    return model


# PyTorch's CPU allocator aligns to 64 bytes; tensors read out of a safetensors buffer need not be
ALIGNMENT = 64


def realign(model: nn.Module) -> int:
    """Copy every plain parameter and buffer whose storage is not 64-byte aligned into fresh memory; return how many.

    A loaded checkpoint can hand out tensors at any offset of its file buffer. A float GEMM on a misaligned weight
    takes another kernel path and sums in another order, so a reloaded model differed from the saved one in the last
    bit. Packed weights are left alone: their loops read any alignment."""
    moved = 0
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if t is None or type(t) not in (torch.Tensor, nn.Parameter) or t.device.type != "cpu" or t.is_meta:
                    continue
                if t.numel() == 0 or t.data_ptr() % ALIGNMENT == 0:
                    continue
                fresh = t.detach().clone()  # new storage from the allocator, so aligned; strides kept
                if isinstance(t, nn.Parameter):
                    fresh = nn.Parameter(fresh, requires_grad=t.requires_grad)
                store[name] = fresh
                moved += 1
    return moved


def finish_load(model: nn.Module, st: QuantState) -> None:
    """After the tensors are in: plain tensors realigned (:func:`realign`), execution paths, the timestep hook, the
    model's quantization state."""
    realign(model)
    for name in st.modules:
        mod = model.get_submodule(name)
        if any(t.is_meta for t in getattr(mod.weight, "tensors", dict)().values()):
            raise ValueError(f"the checkpoint lacks the packed weight of {name!r}")
        mod._setup_exec()
    st.hook = TimestepHook(model, *st.config.timestep_range, clock=st.clock)  # each model sets its own active call
    model._dmq = st
