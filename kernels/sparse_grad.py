"""Sparse backward passes: gradients touch only the selected (row, latent) pairs.

The gradient reaching the pre-activations of a top-k encoder is non-zero at k latents per row,
so ``dW_enc`` costs rows x k x d_in work instead of a dense rows x latents x d_in matmul. The
pairs are sorted by latent and summed with ``embedding_bag`` (one bag per latent): no atomics,
deterministic, multi-threaded, and nothing of size rows x k x d is materialised.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def by_latent(latents: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stable sort of flattened (row, slot) pairs by latent: (order, bag offsets per latent)."""
    flat = latents.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_latents)
    offsets = torch.cumsum(counts, 0) - counts
    return order, offsets


def latent_weight_grad(row_vectors: torch.Tensor, latents: torch.Tensor, weights: torch.Tensor, n_latents: int) -> torch.Tensor:
    """G[j] = sum over pairs (r, s) with latents[r, s] == j of weights[r, s] * row_vectors[r]; [n_latents, d].

    ``latents`` and ``weights`` are [rows, k]; this is both dW_enc (row_vectors = x, weights =
    grad of the pre-activations) and dW_dec (row_vectors = grad of the output, weights = values).
    """
    k = latents.shape[1]
    order, offsets = by_latent(latents, n_latents)
    rows = torch.div(order, k, rounding_mode="floor")
    return F.embedding_bag(rows, row_vectors, offsets, mode="sum", per_sample_weights=weights.reshape(-1)[order].to(row_vectors.dtype))


@dataclass(frozen=True)
class Ops:
    """One backend's pieces: the forward selection / gather-sum and the two sparse gradient sums."""

    select: Callable  # (x, W_enc, b_enc, k) -> (values [rows, k], int64 indices [rows, k])
    gather_sum: Callable  # (values, indices, W) -> [rows, d]: sum_s values[r, s] * W[indices[r, s]]
    gathered_dot: Callable  # (W, indices, vectors) -> [rows, k]: <W[indices[r, s]], vectors[r]>
    latent_grad: Callable  # (row_vectors, latents, weights, n_latents) -> [n_latents, d]


class TopKEncode(torch.autograd.Function):
    """(x, W_enc, b_enc) -> (top-k values, indices) with gradients only at the selected latents."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, ops):  # type: ignore[override]
        values, indices = ops.select(x, W_enc, b_enc, k)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.ops = ops
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):  # type: ignore[override]
        x, W_enc, values, indices = ctx.saved_tensors
        grad_pre = grad_values * (values > 0)  # through the ReLU
        n_latents = W_enc.shape[0]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.ops.gather_sum(grad_pre, indices, W_enc)
        if ctx.needs_input_grad[1]:
            grad_W = ctx.ops.latent_grad(x, indices, grad_pre, n_latents)
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n_latents, dtype=grad_pre.dtype, device=grad_pre.device)
            grad_b.index_add_(0, indices.reshape(-1), grad_pre.reshape(-1))
        return grad_x, grad_W, grad_b, None, None


class SparseDecode(torch.autograd.Function):
    """(values [rows, k], indices [rows, k], W_dec) -> sum_s values[r, s] W_dec[indices[r, s]]; sparse gradients."""

    @staticmethod
    def forward(ctx, values, indices, W_dec, ops):  # type: ignore[override]
        ctx.save_for_backward(values, indices, W_dec)
        ctx.ops = ops
        return ops.gather_sum(values, indices, W_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = ctx.ops.gathered_dot(W_dec, indices, grad_out)
        if ctx.needs_input_grad[2]:
            grad_W = ctx.ops.latent_grad(grad_out, indices, values, W_dec.shape[0])
        return grad_values, None, grad_W, None


def embedding_bag_sum(values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(indices, W, mode="sum", per_sample_weights=values.to(W.dtype))


def gathered_dot(W: torch.Tensor, indices: torch.Tensor, vectors: torch.Tensor, rows_per_chunk: int = 1024) -> torch.Tensor:
    """out[r, s] = <W[indices[r, s]], vectors[r]>, in row chunks (never all rows x k x d at once)."""
    out = torch.empty(indices.shape, dtype=vectors.dtype, device=vectors.device)
    for start in range(0, indices.shape[0], rows_per_chunk):
        stop = start + rows_per_chunk
        out[start:stop] = torch.bmm(W[indices[start:stop]], vectors[start:stop, :, None]).squeeze(-1)
    return out
