"""Structural roles of a backbone's layers, from module types and their place in the module tree (no family names).

A denoiser's Linear / Conv layers fall into a few roles that quantize differently:

- ``first``: the layer that embeds the latent (patch embedding, ``conv_in``, ``x_embedder``): outside the blocks,
  input width = the model's ``in_channels``;
- ``last``: the output projection (``proj_out``, ``conv_out``): outside the blocks, output width = ``out_channels``
  times the patch volume;
- ``embedder``: timestep, guidance, class and pooled-text embedders: the MLPs that build the conditioning vector
  (inside a ``*TimestepEmbedding`` module, or an MLP beside one in an embedding whose forward takes a pooled vector);
- ``modulation``: the layers that map the conditioning vector to norm shifts / scales / gates: Linears of
  ``*Norm*`` modules (adaLN, AdaGroupNorm, AdaLayerNormContinuous), the one Linear of a convolutional residual block
  (``time_emb_proj``), ``Sequential(SiLU, Linear)`` modulation heads, a Linear beside a timestep embedder reading its
  output, and a final modulation outside the blocks that doubles the width of the last layer's input;
- ``context``: other layers outside the blocks (text-token projections such as ``context_embedder``,
  ``caption_projection``, ``txt_in``);
- ``body``: everything inside the blocks.

``embedder`` and ``modulation`` layers see one token per sample (:data:`PER_SAMPLE`): all weight, almost no compute.
:func:`observe_rows` measures the rows per sample each layer sees in a real forward, which checks the rules.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
import re
import warnings
from collections.abc import Callable

import torch
from torch import nn

from dmq.calibration import layer_input

ROLES = ("first", "last", "embedder", "modulation", "context", "body")
PER_SAMPLE = ("embedder", "modulation")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _in_dim(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _out_dim(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _is_time_embedding(m: nn.Module) -> bool:
    return type(m).__name__.endswith(("TimestepEmbedding", "TimestepEmbedder"))  # diffusers' / DiT-style naming


def _cfg(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, dict):  # diffusers' FrozenDict
        return dict(cfg)
    return {}  # no config, or another library's (transformers): not a denoiser with a latent width


def _block_containers(model: nn.Module) -> set[str]:
    """Names of the ModuleLists of repeated blocks (every element holds a layer)."""
    return {n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0
            and all(any(isinstance(x, LAYER_TYPES) for x in b.modules()) for b in m)}


def _takes_pooled(m: nn.Module) -> bool:
    try:
        return any("pooled" in p for p in inspect.signature(m.forward).parameters)
    except (TypeError, ValueError):
        return False


def _per_sample_role(model: nn.Module, name: str, mod: nn.Module) -> str | None:
    parent_name = name.rpartition(".")[0]
    ancestors = []
    n = name
    while "." in n:
        n = n.rpartition(".")[0]
        ancestors.append(model.get_submodule(n))
    parent = ancestors[0] if ancestors else model
    if any(_is_time_embedding(a) for a in ancestors):
        return "embedder"
    if not isinstance(mod, nn.Linear):
        return None
    if "Norm" in type(parent).__name__:
        return "modulation"
    if isinstance(parent, nn.Sequential) and len(parent) == 2 and isinstance(parent[0], nn.SiLU) and parent[1] is mod:
        return "modulation"
    siblings = list(parent.children())
    if ancestors and sum(isinstance(s, (nn.Conv2d, nn.Conv3d)) for s in siblings) >= 2 and \
            sum(isinstance(s, nn.Linear) for s in siblings) == 1:
        return "modulation"  # the one Linear of a convolutional residual block reads the time embedding
    temb = [s for s in siblings if _is_time_embedding(s)]
    if temb and parent_name and mod in siblings:
        widths = {_out_dim(x) for x in temb[0].modules() if isinstance(x, nn.Linear)}
        if mod.in_features in widths:
            return "modulation"  # reads the timestep embedding beside it
    grand = ancestors[1] if len(ancestors) > 1 else (model if ancestors else None)
    if grand is not None and any(_is_time_embedding(s) for s in grand.children()) and _takes_pooled(grand) \
            and not _is_time_embedding(parent) and parent is not grand:
        return "embedder"  # pooled-vector MLP inside a combined timestep embedding
    return None


def classify(model: nn.Module) -> dict[str, str]:
    """``{layer name: role}`` for every Linear / Conv layer of ``model`` (roles: :data:`ROLES`)."""
    cfg = _cfg(model)
    blocks = _block_containers(model)
    layers = [(n, m) for n, m in model.named_modules() if n and isinstance(m, LAYER_TYPES)]
    roles: dict[str, str] = {}
    for name, mod in layers:
        role = _per_sample_role(model, name, mod)
        if role is not None:
            roles[name] = role
        elif any(name.startswith(b + ".") for b in blocks):
            roles[name] = "body"
    outside = [(n, m) for n, m in layers if n not in roles]
    c_in = cfg.get("in_channels")
    if c_in is None:  # not a denoiser with a config: no latent width to find the first / last layers by
        roles.update({n: "body" for n, _ in outside})
        return {n: roles[n] for n, _ in layers}
    c_out = cfg.get("out_channels") or c_in
    patch = cfg.get("patch_size") or 1
    vol = math.prod(patch) if isinstance(patch, (tuple, list)) else patch * patch
    if cfg.get("patch_size") is None and cfg.get("all_patch_size"):  # one patch size per resolution (Z-Image)
        vol = cfg["all_patch_size"][0] ** 2 * (cfg.get("all_f_patch_size") or [1])[0]
    text_widths = set()
    for k in ("joint_attention_dim", "caption_channels", "text_dim", "pooled_projection_dim", "encoder_hid_dim",
              "cap_feat_dim"):
        v = cfg.get(k)  # HiDream lists one width per text encoder
        text_widths.update(v if isinstance(v, (list, tuple)) else [v])
    text_widths = {w for w in text_widths if isinstance(w, int)}
    lay = dict(layers)

    def prefer_latent(names: list[str]) -> list[str]:
        """Among several candidates, drop those that read a text-width input (widths coincide in tiny configs)."""
        if len(names) < 2:
            return names
        return [n for n in names if _in_dim(lay[n]) not in text_widths] or names

    firsts = prefer_latent([n for n, m in outside if _in_dim(m) == c_in])
    if not firsts and cfg.get("all_patch_size"):
        # Z-Image's Linear patch embedding reads the patchified latent. (As a rule for every config this also finds
        # Lumina 2's, HiDream's and AuraFlow's, but misfires on tiny CogVideoX / CogView4 configs whose widths
        # coincide, so it stays with the config that declares it.)
        firsts = prefer_latent([n for n, m in outside if isinstance(m, nn.Linear) and m.in_features == c_in * vol])
    cands = prefer_latent([n for n, m in outside if _out_dim(m) in (c_out, c_out * vol) and n not in firsts])
    # the final norm's shift and scale (DiT's proj_out_1): doubles the width the output projection reads
    final_mod = {n for n in cands if isinstance(lay[n], nn.Linear) and lay[n].out_features == 2 * lay[n].in_features
                 and any(o != n and _in_dim(lay[o]) == lay[n].in_features for o in cands)}
    lasts = [n for n in cands if n not in final_mod][-1:]  # still several: output layers are registered last
    if cands and not lasts:  # every candidate doubles its width: the one registered last is the output layer
        lasts = [cands[-1]]
        final_mod.discard(cands[-1])
    last_in = {_in_dim(lay[n]) for n in lasts}
    for name, mod in outside:
        if name in firsts:
            roles[name] = "first"
        elif name in lasts:
            roles[name] = "last"
        elif name in final_mod or (isinstance(mod, nn.Linear) and mod.in_features in last_in
                                   and mod.out_features == 2 * mod.in_features):
            roles[name] = "modulation"
        else:
            roles[name] = "context"
    return {n: roles[n] for n, _ in layers}


def tables(model: nn.Module) -> dict[str, str]:
    """``{name: "embedder"}`` for every ``nn.Embedding`` of ``model``: a lookup table inside a backbone is a
    conditioning embedder (class / label tables), one row per sample; :func:`classify` covers the matmul layers."""
    return {n: "embedder" for n, m in model.named_modules() if n and isinstance(m, nn.Embedding)}


def names_with_role(model: nn.Module, *roles: str) -> list[str]:
    """Names of the layers of ``model`` with one of ``roles`` (``"per_sample"`` stands for :data:`PER_SAMPLE`)."""
    want = set()
    for r in roles:
        if r == "per_sample":
            want.update(PER_SAMPLE)
        elif r in ROLES:
            want.add(r)
        else:
            raise ValueError(f"unknown structural role {r!r}; valid: {', '.join(ROLES + ('per_sample',))}")
    return [n for n, r in classify(model).items() if r in want]


@torch.no_grad()
def observe_rows(model: nn.Module, run: Callable[[nn.Module], object], batch: int) -> dict[str, float]:
    """Rows (tokens / pixels) per sample each Linear / Conv layer sees in ``run(model)`` on ``batch`` samples; a layer
    that did not run is absent. One row per sample marks a conditioning-path layer."""
    rows: dict[str, float] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, LAYER_TYPES):
            def pre(m, args, kwargs, name=name):
                x = layer_input(args, kwargs)
                n = x.numel() // m.in_features if isinstance(m, nn.Linear) else x[0, 0].numel() * x.shape[0]
                rows.setdefault(name, n / batch)
            hooks.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        run(model)
    finally:
        for h in hooks:
            h.remove()
    return rows


def expand_patterns(model: nn.Module, patterns: tuple[str, ...], roles: dict[str, str] | None = None
                    ) -> tuple[str, ...]:
    """``patterns`` with every ``@role`` replaced by the exact names of the layers in that role. ``@role<N%`` takes
    the role only while its weights are under N% of the model's parameters (cheap enough to keep in 16 bits).
    A glob that matches no module name is reported with a warning (a typo would otherwise silently quantize); an
    unknown role raises ``ValueError``."""
    roles = classify(model) if roles is None else roles
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for p in patterns:
        if p.startswith("@"):
            m = re.fullmatch(r"@(\w+)(?:<([0-9]*\.?[0-9]+)%)?", p)
            role = m.group(1) if m else p
            if role != "per_sample" and role not in ROLES:
                raise ValueError(f"unknown structural role {p!r} in keep_fp; valid: "
                                 f"{', '.join('@' + r for r in ROLES + ('per_sample',))}, optionally '<N%'")
            want = PER_SAMPLE if role == "per_sample" else (role,)
            layers = [n for n, r in roles.items() if r in want]
            if m.group(2) is not None:
                share = sum(model.get_submodule(n).weight.numel() for n in layers) / max(
                    sum(t.numel() for t in model.parameters()), 1)
                if share >= float(m.group(2)) / 100:
                    continue
            out.extend(layers)
        else:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                warnings.warn(f"keep_fp / exclude pattern {p!r} matches no module of {type(model).__name__}",
                              stacklevel=3)
            out.append(p)
    return tuple(out)
