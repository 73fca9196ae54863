"""vqim kernels: one module per op (Triton kernel, launcher, torch reference), a backend
registry, and the compiled CUDA twins in ``_C``. Importing never touches the GPU."""

from ._registry import BACKENDS, registered, use_backend
from .codebook_lookup import codebook_lookup, codebook_lookup_ref, codebook_quantize

__all__ = [
    "BACKENDS",
    "codebook_lookup",
    "codebook_lookup_ref",
    "codebook_quantize",
    "registered",
    "use_backend",
]
