"""dmq: post-training quantization for diffusion backbones (U-Net and DiT), INT and low-bit float formats.

>>> import dmq
>>> model = dmq.quantize(unet, "w8a8")                      # doctest: +SKIP
>>> dmq.calibrate(model, lambda m: pipe(labels, num_inference_steps=20))  # doctest: +SKIP
>>> dmq.freeze(model)                                       # doctest: +SKIP
>>> model.save_pretrained("unet-w8a8")                    # doctest: +SKIP
>>> UNet2DModel.from_pretrained("unet-w8a8")               # doctest: +SKIP  (after import dmq)
>>> UNet2DModel.from_pretrained(path, quantization_config=dmq.DmqConfig("w4a16"))  # doctest: +SKIP
"""

from dmq import budget, formats, kernels, structure
from dmq.api import (
    calibrate,
    dequantize,
    freeze,
    full_precision,
    learned_config,
    quantize,
    quantizers,
    restore,
    summary,
    unet_skip_splits,
)
from dmq.calibration import AllSteps, NormalSteps, StepPolicy, UniformSteps
from dmq.config import (
    PRESETS,
    VARIANTS,
    QuantConfig,
    QuantSpec,
    config_from_json,
    config_to_json,
    get_config,
    preset_names,
)
from dmq.embedding import QuantEmbedding
from dmq.modules import QuantAttnProcessor, QuantConv2d, QuantLinear
from dmq.packed import weight_bytes
from dmq.quantizer import NotCalibratedError, TensorQuantizer
from dmq.serialization import load, quantization_map, save
from dmq.sync import sync_statistics

try:  # the diffusers quantization backend: quant_method="dmq"
    from dmq.backend import DmqConfig, register
except ImportError:  # diffusers without a quantizer registry
    DmqConfig = None
else:
    register()

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "VARIANTS", "AllSteps", "DmqConfig", "NormalSteps", "NotCalibratedError", "QuantAttnProcessor",
    "QuantConfig",
    "QuantConv2d", "QuantEmbedding", "QuantLinear", "QuantSpec", "StepPolicy", "TensorQuantizer", "UniformSteps",
    "calibrate",
    "budget", "config_from_json", "config_to_json", "dequantize", "formats", "freeze", "full_precision",
    "get_config", "kernels",
    "learned_config", "load", "preset_names", "quantization_map", "quantize", "quantizers", "restore", "save",
    "structure", "summary", "sync_statistics", "unet_skip_splits", "weight_bytes",
]
