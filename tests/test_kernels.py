"""Kernels against the torch reference: every Triton kernel under TRITON_INTERPRET=1, and the CPU path."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton compiles anything

import pytest
import torch

import interp_kernels as K
from interp_kernels import reference

SHAPES = [  # rows, d_in, latents, k: ragged sizes, k > tile, k = 1, latents not a multiple of the tile
    (7, 12, 50, 3),
    (33, 40, 130, 1),
    (20, 24, 200, 70),
    (16, 16, 64, 64),
]


def random_problem(rows, d, latents, seed=0, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    W = torch.randn(latents, d, generator=g) / d**0.5
    b = torch.randn(latents, generator=g) * 0.1
    if ties:  # duplicate latents: equal pre-activations everywhere
        W[1::2] = W[0::2][: W[1::2].shape[0]]
        b[1::2] = b[0::2][: b[1::2].shape[0]]
    return x, W, b


def assert_same_topk(values, indices, ref_values, ref_indices, x, W, b):
    """Same multiset of values; indices equal where values are unique, and every index's value right."""
    torch.testing.assert_close(values.sort(-1).values, ref_values.sort(-1).values, rtol=1e-5, atol=1e-5)
    dense = reference.encode_dense(x, W, b)
    torch.testing.assert_close(dense.gather(1, indices), values, rtol=1e-5, atol=1e-5)
    assert all(len(set(row.tolist())) == len(row) for row in indices)  # no latent twice


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_encode_matches_reference(backend, shape, ties):
    rows, d, latents, k = shape
    x, W, b = random_problem(rows, d, latents, ties=ties)
    values, indices = K.topk_encode(x, W, b, k, backend=backend, chunk=48)
    ref_values, ref_indices = reference.topk_encode(x, W, b, k)
    assert values.shape == indices.shape == (rows, k) and indices.dtype == torch.int64
    assert_same_topk(values, indices, ref_values, ref_indices, x, W, b)
    if not ties:
        assert [set(r.tolist()) for r in indices] == [set(r.tolist()) for r in ref_indices]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_encode_decode_gradients_match_reference(backend, shape):
    rows, d, latents, k = shape
    x, W, b = random_problem(rows, d, latents, seed=1)
    W_dec = torch.randn(latents, d + 3) / d**0.5
    target = torch.randn(rows, d + 3)

    def loss_and_grads(kind):
        params = [t.clone().requires_grad_() for t in (x, W, b, W_dec)]
        values, indices = K.topk_encode(*params[:3], k, backend=kind)
        out = K.sparse_decode(values, indices, params[3], backend=kind)
        loss = (out - target).pow(2).sum()
        loss.backward()
        return out.detach(), [p.grad for p in params]

    out, grads = loss_and_grads(backend)
    ref_out, ref_grads = loss_and_grads("reference")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for name, got, want in zip(["x", "W_enc", "b_enc", "W_dec"], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_encoder_gradient_is_zero_outside_the_selected_latents():
    x, W, b = random_problem(10, 8, 40, seed=2)
    W = W.requires_grad_()
    values, indices = K.topk_encode(x, W, b, 3, backend="cpu")
    values.sum().backward()
    touched = torch.zeros(40, dtype=torch.bool)
    touched[indices[values > 0]] = True
    assert (W.grad[~touched] == 0).all() and (W.grad[touched].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_with_k_equal_one_and_ragged_rows(backend):
    g = torch.Generator().manual_seed(3)
    values = torch.rand(13, 1, generator=g)
    indices = torch.randint(0, 9, (13, 1), generator=g)
    W = torch.randn(9, 5, generator=g)
    b = torch.randn(5, generator=g)
    torch.testing.assert_close(K.sparse_decode(values, indices, W, b, backend=backend), values * W[indices[:, 0]] + b)


def test_bfloat16_compute_selects_nearly_the_same_latents():
    x, W, b = random_problem(64, 96, 512, seed=4)
    _, exact = reference.topk_encode(x, W, b, 16)
    values, approx = K.topk_encode(x, W, b, 16, backend="cpu", compute_dtype=torch.bfloat16)
    overlap = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)) / exact.numel()
    assert overlap > 0.9 and values.dtype == torch.float32


def test_bad_arguments():
    x, W, b = random_problem(4, 8, 16)
    with pytest.raises(ValueError, match="k=17"):
        K.topk_encode(x, W, b, 17, backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        K.topk_encode(x, W, b, 2, backend="cuda-magic")
