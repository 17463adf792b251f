"""Sparse dictionaries: SAEs (input site = output site) and transcoders (input site -> output site).

Architectures: ``topk`` (k latents per token), ``batchtopk`` (k x rows latents per batch; at
inference one threshold, calibrated on training rows so that k latents fire per row on average), ``jumprelu`` (per-latent thresholds trained through a
straight-through estimator with an L0 penalty) and ``relu`` (ReLU with an L1 penalty).

Conventions (those of EleutherAI sparsify and OpenAI's TopK SAEs):
- weights: W_enc [latents, d_in], b_enc [latents], W_dec [latents, d_out], b_dec [d_out];
  the trainer keeps decoder rows at unit norm;
- an SAE encodes ``x - b_dec``; a transcoder encodes its input as is (``subtract_b_dec``);
- input normalisation: inputs and targets are multiplied by fixed scalars (``input_scale``,
  ``output_scale``; for an SAE they are one number) chosen so that E[||x||^2] = d, and outputs
  are divided again, so callers always work in the model's own scale. ``fold_scaling`` bakes
  the scalars into the weights (for export).
TopK and BatchTopK use the fused kernels of ``interp_kernels``: no rows x latents matrix, and
gradients only at the selected latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

import interp_kernels as K
from interp.distributed import SINGLE, Ranks
from interp.errors import InputError

Architecture = Literal["topk", "batchtopk", "jumprelu", "relu"]
ARCHITECTURES = ("topk", "batchtopk", "jumprelu", "relu")


@dataclass
class DictionaryConfig:
    d_in: int
    n_latents: int
    architecture: Architecture = "topk"
    k: int = 32  # topk / batchtopk
    d_out: int | None = None  # None: same as d_in
    input_site: str = ""
    output_site: str = ""  # "" or equal to input_site: an SAE
    model: str = ""
    subtract_b_dec: bool | None = None  # None: True for an SAE, False for a transcoder
    l1_coefficient: float = 1e-3  # relu: weight of the mean L1 norm (relative to the FVU)
    l0_coefficient: float = 1e-3  # jumprelu: weight of the mean number of firing latents
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.1
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"architecture {self.architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.n_latents:
            raise InputError(f"k={self.k} must be between 1 and the number of latents ({self.n_latents})")
        if self.subtract_b_dec is None:
            self.subtract_b_dec = not self.is_transcoder

    @property
    def is_transcoder(self) -> bool:
        return bool(self.output_site) and self.output_site != self.input_site

    @property
    def out_dim(self) -> int:
        return self.d_out or self.d_in


@dataclass
class Code:
    """Latent activations: sparse slots (``values``/``indices`` [rows, slots], zero = inactive)
    for the TopK family, or a ``dense`` [rows, latents] matrix for ReLU / JumpReLU."""

    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def l0(self) -> torch.Tensor:
        """Active latents per row."""
        return (self.dense > 0).sum(-1) if self.dense is not None else (self.values > 0).sum(-1)

    def to_dense(self, n_latents: int) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        out = torch.zeros(self.values.shape[0], n_latents, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, self.indices, self.values)

    def fire_counts(self, n_latents: int) -> torch.Tensor:
        """Int64 [latents]: on how many rows each latent fired."""
        if self.dense is not None:
            return (self.dense > 0).sum(0)
        return torch.bincount(self.indices[self.values > 0], minlength=n_latents)


class SparseDictionary(nn.Module):
    """An SAE or transcoder. ``forward(x)`` returns the reconstruction (or predicted output)."""

    def __init__(self, config: DictionaryConfig, *, seed: int = 0):
        super().__init__()
        self.config = c = config
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(c.d_in)
        self.W_enc = nn.Parameter(torch.empty(c.n_latents, c.d_in).uniform_(-bound, bound, generator=g))
        self.b_enc = nn.Parameter(torch.zeros(c.n_latents))
        tied = not c.is_transcoder and c.out_dim == c.d_in
        W_dec = self.W_enc.detach().clone() if tied else torch.randn(c.n_latents, c.out_dim, generator=g)
        self.W_dec = nn.Parameter(W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        self.b_dec = nn.Parameter(torch.zeros(c.out_dim))
        if c.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((c.n_latents,), math.log(c.jumprelu_init_threshold)))
        self.register_buffer("threshold", torch.zeros(()))  # batchtopk: the inference threshold
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("output_scale", torch.ones(()))
        self.compute_dtype: torch.dtype | None = None  # e.g. bfloat16 matmuls in the TopK encoder

    # ------------------------------------------------------------- encoding
    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: the scaled input, minus b_dec for an SAE."""
        x = x.to(self.W_enc.dtype) * self.input_scale
        return x - self.b_dec if self.config.subtract_b_dec else x

    def encode(self, x: torch.Tensor) -> Code:
        """The code of ``x`` [rows, d_in] (in the model's scale)."""
        return self.encode_scaled(self.encoder_input(x), batch=self.training)

    def encode_scaled(self, z: torch.Tensor, *, batch: bool = False, reduce: Ranks = SINGLE) -> Code:
        """The code of an encoder input; ``batch=True`` selects BatchTopK's per-batch rule (training),
        over the global batch of a data-parallel step whose ranks are ``reduce``.

        ``compute_dtype`` (e.g. bfloat16 matmuls) applies in training mode only: inference and
        evaluation always compute in float32, so metrics do not depend on the machine.
        """
        c = self.config
        if c.architecture == "topk":
            return Code(*K.topk_encode(z, self.W_enc, self.b_enc, c.k, compute_dtype=self._compute_dtype()))
        if c.architecture == "batchtopk":
            return self._batch_topk(z, reduce) if batch else Code(dense=_threshold(self.pre_activations(z), self.threshold))
        pre = self.pre_activations(z)
        if c.architecture == "relu":
            return Code(dense=torch.relu(pre))
        return Code(dense=_JumpReLU.apply(pre, self.log_threshold.exp(), c.jumprelu_bandwidth))

    def _compute_dtype(self) -> torch.dtype | None:
        return self.compute_dtype if self.training else None

    def pre_activations(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z, self.W_enc, self.b_enc)

    def _batch_topk(self, z: torch.Tensor, reduce: Ranks = SINGLE) -> Code:
        """The rows x k largest activations of the (global) batch, exactly."""
        values, indices, kth = self._batch_selection(z, reduce=reduce)
        keep = (values.detach() >= kth) & (values.detach() > 0)
        local = values.detach()[keep].min() if bool(keep.any()) else values.new_tensor(math.inf)
        smallest = reduce.all_reduce(local.reshape(1), "min")[0]
        if self.training and bool(smallest < math.inf):
            # Running estimate of the inference threshold (the batch's smallest kept value), started
            # at the first batch's value rather than at 0, so it is not biased low in short runs.
            # The trainer replaces it at the end with ``calibrate_threshold`` on training rows.
            self.threshold.copy_(smallest if float(self.threshold) == 0 else 0.99 * self.threshold + 0.01 * smallest)
        return Code(values * keep, indices)

    def _batch_selection(self, z: torch.Tensor, rows_per_pass: int = 4096, reduce: Ranks = SINGLE
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's top ``cap`` candidates (values, indices) and the (rows x k)-th largest activation.

        If some row had all its candidates at or above that value it might deserve more, so
        ``cap`` doubles and the selection is redone. Rows are encoded ``rows_per_pass`` at a time.
        In a data-parallel step (``reduce``) ``z`` is this rank's part of the batch and the k-th
        value is the global batch's: every rank's largest candidates are gathered.
        """
        k, n = self.config.k, self.config.n_latents
        rows = int(reduce.all_reduce(torch.tensor([z.shape[0]]))) if reduce.active else z.shape[0]
        cap = min(4 * k, n)
        while True:
            parts = [K.topk_encode(chunk, self.W_enc, self.b_enc, cap, compute_dtype=self._compute_dtype())
                     for chunk in z.split(rows_per_pass)]
            values, indices = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            flat = values.detach().reshape(-1)
            count = rows * k  # cap >= k: every rank has at least its rows x k candidates
            best = flat.topk(min(count, flat.numel())).values
            if reduce.active:  # pad to a common length, gather, take the global top
                best = reduce.all_gather(F.pad(best, (0, count - best.numel()), value=-math.inf)).reshape(-1).topk(count).values
            kth = best[-1]
            weakest = values.detach().min(-1).values
            more = reduce.all_reduce(((weakest >= kth) & (weakest > 0)).any().to(torch.int32).reshape(1), "max")
            if cap == n or not bool(more):
                return values, indices, kth
            cap = min(2 * cap, n)

    @torch.no_grad()
    def calibrate_threshold(self, x: torch.Tensor) -> float:
        """BatchTopK: set the inference threshold from rows ``x`` [rows, d_in] of the training data
        to the (rows x k)-th largest activation among them, so that inference keeps k latents per
        row on average, as training did. Computed in float32, as inference is; returns it."""
        if self.config.architecture != "batchtopk":
            raise InputError(f"calibrate_threshold is for batchtopk dictionaries, not {self.config.architecture}")
        training = self.training
        self.eval()
        try:
            _, _, kth = self._batch_selection(self.encoder_input(x))
        finally:
            self.train(training)
        self.threshold.fill_(max(float(kth), 0.0))
        return float(self.threshold)

    # ------------------------------------------------------------- decoding
    def decode_scaled(self, code: Code) -> torch.Tensor:
        """Decoder output in the scaled space (before dividing by ``output_scale``)."""
        if code.dense is not None:
            return F.linear(code.dense, self.W_dec.T, self.b_dec)
        return K.sparse_decode(code.values, code.indices, self.W_dec, self.b_dec)

    def decode(self, code: Code) -> torch.Tensor:
        """Output in the model's scale, [rows, d_out]."""
        return self.decode_scaled(code) / self.output_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ----------------------------------------------------------- utilities
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component along each decoder row (rows stay on the unit sphere)."""
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    @torch.no_grad()
    def fold_scaling(self) -> None:
        """Bake the input/output scales into the weights; the function computed is unchanged.

        Encoder: (s x - b) W^T = (x - b/s)(s W)^T, so W_enc *= s_in; decoder: (f W_dec + b_dec)/s_out,
        so W_dec and b_dec /= s_out. For an SAE s_in = s_out, so the shared b_dec stays consistent.
        """
        self.W_enc *= self.input_scale
        self.W_dec /= self.output_scale
        self.b_dec /= self.output_scale
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)


def _threshold(pre: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return pre * (pre > threshold)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); theta gets a straight-through pseudo-gradient (rectangle kernel of width ``bandwidth``)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = (-(threshold / ctx.bandwidth) * near * grad).sum(0)
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """H(pre - theta) with the same pseudo-gradient for theta: the differentiable L0 of JumpReLU."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        near = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, (-(1.0 / ctx.bandwidth) * near * grad).sum(0), None


def jumprelu_l0(dictionary: SparseDictionary, z: torch.Tensor, *, rows: float | None = None) -> torch.Tensor:
    """Mean number of firing latents per row, differentiable with respect to the thresholds
    (``rows``: divide by this many rows instead, e.g. a data-parallel step's global batch)."""
    pre = dictionary.pre_activations(z).detach()
    theta = dictionary.log_threshold.exp()
    return _Step.apply(pre, theta, dictionary.config.jumprelu_bandwidth).sum(-1).sum() / (rows or z.shape[0])
