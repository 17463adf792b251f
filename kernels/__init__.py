"""interp_kernels: TopK dictionary kernels with a torch reference, a CPU fast path and Triton.

``topk_encode`` and ``sparse_decode`` dispatch by device (``backend="auto"``): Triton on CUDA
tensors, the CPU fast path on CPU tensors. Either way the backward pass is sparse: gradients
reach only the k selected latents of each row. ``backend="reference"`` runs the dense torch
computation (for tests and as the baseline in benchmarks); ``backend="triton"`` on CPU tensors
works under ``TRITON_INTERPRET=1`` (slow; correctness tests only).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from interp_kernels import reference
from interp_kernels.cpu import DEFAULT_CHUNK, topk_encode_chunked
from interp_kernels.sparse_grad import TopKEncode, TritonDecode, latent_weight_grad

BACKENDS = ("auto", "reference", "cpu", "triton")


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or anywhere under TRITON_INTERPRET=1."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_usable(device) else "cpu"
    if backend == "triton" and not triton_usable(device):
        raise RuntimeError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
    return backend


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 / AMX); elsewhere it is emulated and slow."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
    backend: str = "auto", compute_dtype: torch.dtype | None = None, chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ReLU(x W_enc^T + b_enc) per row: (values [rows, k], int64 indices [rows, k]).

    ``compute_dtype`` (CPU path) runs the matmuls in that dtype, e.g. ``torch.bfloat16``.
    """
    chosen = resolve_backend(backend, x.device)
    if chosen == "reference":
        return reference.topk_encode(x, W_enc, b_enc, k)
    if chosen == "triton":
        from interp_kernels.triton_kernels import latent_grad_triton, topk_encode_triton

        return TopKEncode.apply(x, W_enc, b_enc, k, topk_encode_triton, latent_grad_triton)
    select = functools.partial(topk_encode_chunked, chunk=chunk, compute_dtype=compute_dtype)
    return TopKEncode.apply(x, W_enc, b_enc, k, select, latent_weight_grad)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None, *, backend: str = "auto") -> torch.Tensor:
    """sum_s values[r, s] * W_dec[indices[r, s]] (+ b_dec): [rows, d_out]. Gradients are sparse."""
    chosen = resolve_backend(backend, values.device)
    if chosen == "reference":
        rows, k = indices.shape
        out = reference.decode(values.reshape(-1), indices.reshape(-1), torch.arange(0, rows * k, k, device=values.device), W_dec)
    elif chosen == "triton":
        out = TritonDecode.apply(values, indices, W_dec)
    else:
        out = F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.to(W_dec.dtype))
    return out if b_dec is None else out + b_dec


__all__ = ["BACKENDS", "native_bfloat16", "reference", "resolve_backend", "sparse_decode", "topk_encode", "triton_usable"]
