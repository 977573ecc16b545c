"""pipelines: dmq and the samplers applied to diffusers pipelines, plus evaluation (FID, CLIP score)."""

from pipelines.clip_compat import import_clip
from pipelines.dc_search import search_dc_ratios
from pipelines.digits_classifier import DigitClassifier
from pipelines.digits_data import load_digits
from pipelines.digits_pipeline import DigitsPipeline
from pipelines.gmm import GaussianMixture, GMMDenoiser, reference_sample
from pipelines.quantize import quantize_pipeline
from pipelines.sampler_swap import use_sampler
from pipelines.schedule_search import fit_sampler, search_schedule
from pipelines.serialization import load_quantized, save_quantized

__all__ = [
    "DigitClassifier", "DigitsPipeline", "GMMDenoiser", "GaussianMixture", "import_clip", "load_digits",
    "fit_sampler", "load_quantized", "quantize_pipeline", "reference_sample", "save_quantized",
    "search_dc_ratios", "search_schedule", "use_sampler",
]
