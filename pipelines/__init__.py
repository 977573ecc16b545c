"""pipelines: dmq and the samplers applied to diffusers pipelines, plus evaluation (FID, CLIP score)."""

from pipelines.clip_compat import import_clip

__all__ = ["import_clip"]
