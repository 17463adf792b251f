"""Sparse backward passes: gradients touch only the selected (row, latent) pairs.

The gradient reaching the pre-activations of a top-k encoder is non-zero at k latents per row,
so ``dW_enc`` costs rows x k x d_in work instead of a dense rows x latents x d_in matmul. The
pairs are sorted by latent and summed with ``embedding_bag`` (one bag per latent): no atomics,
deterministic, multi-threaded, and nothing of size rows x k x d is materialised. ``db_enc`` comes
out of the same sum (a column of ones appended to the row vectors), so it is deterministic too.

On CPU the sparse decoder is ``F.embedding_bag`` itself, whose own backward already computes the
gradients of the values and of W_dec sparsely; on GPU ``TritonDecode`` does the same in Triton.
"""

from __future__ import annotations

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


class TopKEncode(torch.autograd.Function):
    """(x, W_enc, b_enc) -> (top-k values, indices) with gradients only at the selected latents.

    ``select(x, W_enc, b_enc, k)`` is the forward path (CPU chunks or the Triton kernel);
    ``latent_grad`` sums the W_enc gradient (embedding_bag on CPU, a Triton kernel on GPU).
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, k, select, latent_grad):  # type: ignore[override]
        values, indices = select(x, W_enc, b_enc, k)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(x, W_enc, values, indices)
        ctx.latent_grad = latent_grad
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices):  # type: ignore[override]
        x, W_enc, values, indices = ctx.saved_tensors
        grad_pre = grad_values * (values > 0)  # through the ReLU
        n_latents = W_enc.shape[0]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(indices, W_enc, mode="sum", per_sample_weights=grad_pre.to(W_enc.dtype))
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # One segment sum per latent gives both: the rows [x | 1] weighted by grad_pre.
            ones = x.new_ones(x.shape[0], 1)
            vectors = torch.cat([x, ones], dim=1) if ctx.needs_input_grad[1] else ones
            summed = ctx.latent_grad(vectors, indices, grad_pre, n_latents)
            grad_W = summed[:, :-1].contiguous() if ctx.needs_input_grad[1] else None
            grad_b = summed[:, -1].contiguous() if ctx.needs_input_grad[2] else None
        return grad_x, grad_W, grad_b, None, None, None


class TritonDecode(torch.autograd.Function):
    """(values [rows, k], indices [rows, k], W_dec) -> sum_s values[r, s] W_dec[indices[r, s]], all in Triton."""

    @staticmethod
    def forward(ctx, values, indices, W_dec):  # type: ignore[override]
        from interp_kernels.triton_kernels import decode_triton

        ctx.save_for_backward(values, indices, W_dec)
        return decode_triton(values, indices, W_dec)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        from interp_kernels.triton_kernels import decode_grad_values_triton, latent_grad_triton

        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = decode_grad_values_triton(W_dec, indices, grad_out)
        if ctx.needs_input_grad[2]:
            grad_W = latent_grad_triton(grad_out, indices, values, W_dec.shape[0])
        return grad_values, None, grad_W
