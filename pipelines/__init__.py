"""pipelines: dmq and the samplers applied to diffusers pipelines, plus evaluation (FID, CLIP score)."""

from pipelines.clip_compat import import_clip
from pipelines.dc_search import search_dc_ratios
from pipelines.digits_classifier import DigitClassifier
from pipelines.digits_data import load_digits
from pipelines.digits_pipeline import DigitsPipeline
from pipelines.gmm import GaussianMixture, GMMDenoiser, reference_sample
from pipelines.quantize import quantize_pipeline
from pipelines.sampler_swap import use_sampler

__all__ = [
    "DigitClassifier", "DigitsPipeline", "GMMDenoiser", "GaussianMixture", "import_clip", "load_digits",
    "quantize_pipeline", "reference_sample", "search_dc_ratios", "use_sampler",
]
