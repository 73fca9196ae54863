"""vqim kernels: one module per op (Triton kernel, launcher, torch reference), a backend
registry, and the compiled CUDA twins in ``_C``. Importing never touches the GPU."""

from ._registry import BACKENDS, registered, use_backend
from .codebook_lookup import codebook_lookup, codebook_lookup_ref, codebook_quantize
from .conv_attention import (conv_attention, conv_attention_ref, conv_cache_len, conv_cache_slot,
                             conv_decode_attention, conv_decode_attention_ref, conv_mask_ref)
from .cfg_sample import cfg_sample, cfg_sample_ref
from .sampling_params import MAX_SEED, SamplingParams, validate_sampling_params
from .adafactor8 import Adafactor8bit

__all__ = [
    "Adafactor8bit",
    "BACKENDS",
    "MAX_SEED",
    "SamplingParams",
    "cfg_sample",
    "cfg_sample_ref",
    "validate_sampling_params",
    "codebook_lookup",
    "codebook_lookup_ref",
    "codebook_quantize",
    "conv_attention",
    "conv_attention_ref",
    "conv_cache_len",
    "conv_cache_slot",
    "conv_decode_attention",
    "conv_decode_attention_ref",
    "conv_mask_ref",
    "registered",
    "use_backend",
]
