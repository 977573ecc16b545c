"""Accounting of non-finite activation values (NaN, inf) seen during calibration.

Observers skip non-finite values and count them per timestep bin (:class:`dmq.observers.StreamingObserver`). This
module turns those counts into the ``"nonfinite"`` entry of :func:`dmq.summary` and into one warning per
:func:`dmq.calibrate` call naming the worst layers (never one line per layer).
"""

from __future__ import annotations

import logging

from torch import nn

from dmq.quantizer import TensorQuantizer

logger = logging.getLogger("dmq.api")
WORST = 3  # layers named in the warning


def nonfinite_report(model: nn.Module) -> dict[str, dict]:
    """``{quantizer name: {"nonfinite": n, "finite": m, "bins": [non-finite per timestep bin]}}`` for every
    quantizer that skipped a non-finite value, worst first (by count, then by share of its values)."""
    out = {}
    for name, q in model.named_modules():
        if not isinstance(q, TensorQuantizer):
            continue
        finite, nonfinite = q.value_counts()
        if any(nonfinite):
            out[name] = {"nonfinite": sum(nonfinite), "finite": sum(finite), "bins": list(nonfinite)}
    order = sorted(out, key=lambda n: (-out[n]["nonfinite"], out[n]["finite"], n))
    return {n: out[n] for n in order}


def warn_nonfinite(model: nn.Module, before: dict[str, dict]) -> None:
    """One warning if the calibration since ``before`` (a :func:`nonfinite_report`) skipped non-finite values."""
    now = nonfinite_report(model)
    new = {n: e["nonfinite"] - before.get(n, {}).get("nonfinite", 0) for n, e in now.items()}
    new = {n: k for n, k in new.items() if k > 0}
    if not new:
        return
    worst = sorted(new, key=lambda n: (-new[n], now[n]["finite"], n))[:WORST]
    only = [n for n in now if now[n]["finite"] == 0]
    total = sum(1 for m in model.modules() if isinstance(m, TensorQuantizer))
    msg = (f"dmq.calibrate skipped {sum(new.values())} non-finite (NaN/inf) activation values in {len(new)} of "
           f"{total} quantizers; worst: "
           + ", ".join(f"{n} ({new[n]} non-finite, {now[n]['finite']} finite)" for n in worst))
    if only:
        msg += f"; {len(only)} quantizer(s) saw no finite value and will fail at dmq.freeze"
    logger.warning(msg + ". Details: dmq.summary(model)['nonfinite']")
