"""vqim kernels: one module per op (Triton kernel, launcher, torch reference), a backend
registry, and the compiled CUDA twins in ``_C``. Importing never touches the GPU."""

from ._registry import BACKENDS, registered, use_backend
from .add_layer_norm import add_layer_norm, add_layer_norm_ref
from .add_rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm_ref
from .codebook_lookup import codebook_lookup, codebook_lookup_ref, codebook_quantize
from .conv_attention import (conv_attention, conv_attention_ref, conv_cache_len, conv_cache_slot,
                             conv_decode_attention, conv_decode_attention_ref, conv_mask_ref)
from .cfg_sample import cfg_probs_ref, cfg_sample, cfg_sample_ref
from .sampling_params import MAX_SEED, SamplingParams, validate_sampling_params
from .adafactor8 import Adafactor8bit
from .int8_linear import int8_linear, int8_linear_ref, quantize_int8
from .rope_decode_attention import apply_rope_ref, rope_decode_attention, rope_decode_attention_ref

__all__ = [
    "Adafactor8bit",
    "BACKENDS",
    "add_layer_norm",
    "add_layer_norm_ref",
    "add_rms_norm",
    "add_rms_norm_ref",
    "rms_norm_ref",
    "MAX_SEED",
    "SamplingParams",
    "cfg_probs_ref",
    "cfg_sample",
    "cfg_sample_ref",
    "validate_sampling_params",
    "codebook_lookup",
    "codebook_lookup_ref",
    "codebook_quantize",
    "int8_linear",
    "int8_linear_ref",
    "quantize_int8",
    "conv_attention",
    "conv_attention_ref",
    "conv_cache_len",
    "conv_cache_slot",
    "conv_decode_attention",
    "conv_decode_attention_ref",
    "conv_mask_ref",
    "apply_rope_ref",
    "rope_decode_attention",
    "rope_decode_attention_ref",
    "registered",
    "use_backend",
]
