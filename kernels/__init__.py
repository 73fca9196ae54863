"""vqim kernels: one module per op (Triton kernel, launcher, torch reference), a backend
registry, and the compiled CUDA twins in ``_C``. Importing never touches the GPU."""

# From a checkout's root (pytest's rootdir, `python -m ...`) this folder is also importable as a
# top-level `kernels`, the name of Hugging Face's kernel-hub package, which transformers imports
# when it can (its Llama RMSNorm does). Run a second time under that name, this package would
# register every vqim:: custom op again over the first, and the process's later op calls would
# fail at random ("vector::reserve"). Refuse that name: whoever tries it sees an ImportError,
# which transformers takes as "not installed".
if __name__ != "vqim.kernels":
    raise ImportError(f"{__file__} is vqim's kernels package: import it as vqim.kernels, not as {__name__!r}")

from ._registry import BACKENDS, registered, use_backend
from .add_layer_norm import add_layer_norm, add_layer_norm_ref
from .add_rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm_ref
from .codebook_lookup import codebook_lookup, codebook_lookup_ref, codebook_quantize
from .conv_attention import (conv_attention, conv_attention_ref, conv_cache_len, conv_cache_slot,
                             conv_decode_attention, conv_decode_attention_ref, conv_mask_ref)
from .cfg_sample import RowsPlan, cfg_probs_ref, cfg_sample, cfg_sample_ref, cfg_sample_rows, rows_plan, sampling_uniforms
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
    "cfg_sample_rows",
    "RowsPlan",
    "rows_plan",
    "sampling_uniforms",
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
