"""pipelines: dmq and the samplers applied to diffusers pipelines, plus evaluation (FID, CLIP score)."""

from pipelines.clip_compat import import_clip
from pipelines.digits_classifier import DigitClassifier
from pipelines.digits_data import load_digits
from pipelines.digits_pipeline import DigitsPipeline

__all__ = ["DigitClassifier", "DigitsPipeline", "import_clip", "load_digits"]
