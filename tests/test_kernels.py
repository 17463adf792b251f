"""Kernels against the torch reference: the Triton kernels compiled on a CUDA GPU where there is
one, else in Triton's interpreter on the CPU; and the CPU fast path.

Float32 is compared at float32 precision: the Triton encoder multiplies in IEEE float32 (no TF32),
and so does the reference (``allow_tf32`` off), so selected values agree to rounding (1e-5).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # no GPU: the Triton kernels run interpreted (set before they are defined)
TRITON_DEVICE = "cuda" if CUDA else "cpu"

import interp_kernels as K  # noqa: E402
from interp_kernels import reference  # noqa: E402

SHAPES = [  # rows, d_in, latents, k: ragged sizes, k > tile, k = 1, latents not a multiple of the tile
    (7, 12, 50, 3),
    (33, 40, 130, 1),
    (20, 24, 200, 70),
    (16, 16, 64, 64),
]


@pytest.fixture(autouse=True)
def ieee_float32_reference():
    """The torch reference in IEEE float32 on the GPU too (as the Triton kernel computes)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def random_problem(rows, d, latents, seed=0, ties=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    W = torch.randn(latents, d, generator=g) / d**0.5
    b = torch.randn(latents, generator=g) * 0.1
    if ties:  # duplicate latents: equal pre-activations everywhere
        W[1::2] = W[0::2][: W[1::2].shape[0]]
        b[1::2] = b[0::2][: b[1::2].shape[0]]
    return x.to(device), W.to(device), b.to(device)


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
    x, W, b = random_problem(rows, d, latents, ties=ties, device=device_of(backend))
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
    device = device_of(backend)
    x, W, b = random_problem(rows, d, latents, seed=1, device=device)
    W_dec = (torch.randn(latents, d + 3) / d**0.5).to(device)
    target = torch.randn(rows, d + 3).to(device)

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
    device = device_of(backend)
    values = torch.rand(13, 1, generator=g).to(device)
    indices = torch.randint(0, 9, (13, 1), generator=g).to(device)
    W = torch.randn(9, 5, generator=g).to(device)
    b = torch.randn(5, generator=g).to(device)
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


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bias_gradient_is_deterministic_and_exact(backend):
    """db_enc is a per-latent segment sum (no atomics): identical on every run, and equal to a
    float64 sum over the rows that selected each latent."""
    device = device_of(backend)
    x, W, b = random_problem(512, 24, 96, seed=7, device=device)
    weights = torch.randn(512, 8, generator=torch.Generator().manual_seed(8)).to(device)

    def bias_grad():
        bias = b.clone().requires_grad_()
        values, indices = K.topk_encode(x, W, bias, 8, backend=backend)
        (values * weights).sum().backward()
        return bias.grad, values, indices

    grads = [bias_grad() for _ in range(3)]
    assert all(torch.equal(grads[0][0], g[0]) for g in grads[1:])
    _, values, indices = grads[0]
    expected = torch.zeros(96, dtype=torch.float64, device=device)
    expected.index_add_(0, indices.reshape(-1), (weights * (values > 0)).double().reshape(-1))
    torch.testing.assert_close(grads[0][0].double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="compiled Triton kernels need a CUDA GPU")
def test_float32_selection_uses_ieee_precision_on_the_gpu():
    """Pre-activations 2e-4 apart (relative): TF32 (10-bit mantissa) could not order them; the kernel must."""
    x, W, b = random_problem(64, 256, 512, seed=10, device="cuda")
    W[1::2], b[1::2] = W[0::2] * (1 + 2e-4), b[0::2] * (1 + 2e-4)  # each odd latent a hair above its even twin
    # k odd: the last latent picked splits a twin pair, so only a kernel that orders the twins agrees
    values, indices = K.topk_encode(x, W, b, 15, backend="triton")
    ref_values, ref_indices = reference.topk_encode(x, W, b, 15)
    assert [set(r.tolist()) for r in indices] == [set(r.tolist()) for r in ref_indices]
    torch.testing.assert_close(values.sort(-1).values, ref_values.sort(-1).values, rtol=1e-6, atol=1e-6)


def test_gpu_check_script_fails_cleanly_without_cuda():
    if CUDA:
        pytest.skip("this machine has a GPU: run experiments/bench/gpu_check.sh itself")
    script = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "gpu_check.sh"
    import sys

    run = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 1 and "no CUDA device" in run.stderr and "Traceback" not in run.stderr
