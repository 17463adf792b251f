"""Torch references: the dense computations every fast path must reproduce.

Shapes: x [rows, d_in]; W_enc [latents, d_in] (one row per latent, like ``nn.Linear``);
b_enc [latents]; W_dec [latents, d_out]; b_dec [d_out]. A sparse code is (values, latents,
offsets): row ``r`` owns entries ``offsets[r] : offsets[r + 1]`` (the last row runs to the end),
the layout of ``torch.nn.functional.embedding_bag``.
"""

from __future__ import annotations

import torch


def encode_dense(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor) -> torch.Tensor:
    """ReLU pre-activations, [rows, latents]."""
    return torch.relu(x @ W_enc.T + b_enc)


def topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ReLU(x W_enc^T + b_enc) per row: values and latent indices, [rows, k], sorted."""
    return encode_dense(x, W_enc, b_enc).topk(k, dim=-1)


def batch_topk_encode(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK: the ``rows * k`` largest activations of the whole batch, as a dense [rows, latents] mask."""
    dense = encode_dense(x, W_enc, b_enc)
    flat = dense.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(x.shape[0] * k).indices] = True
    return dense * keep.view_as(dense), keep.view_as(dense)


def decode(values: torch.Tensor, latents: torch.Tensor, offsets: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of ``values`` times decoder rows per row of the sparse code (dense reference)."""
    rows = offsets.numel()
    row_of = torch.repeat_interleave(torch.arange(rows, device=values.device), torch.diff(offsets, append=offsets.new_tensor([latents.numel()])))
    dense = torch.zeros(rows, W_dec.shape[0], dtype=W_dec.dtype, device=W_dec.device)
    dense.index_put_((row_of, latents), values.to(W_dec.dtype), accumulate=True)
    out = dense @ W_dec
    return out if b_dec is None else out + b_dec
