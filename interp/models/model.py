"""``Model``: one wrapper over a HF or TransformerLens model, with named sites.

The wrapper owns no weights of its own: ``model.module`` is the model exactly as loaded, and
sites are hooks on its modules. Everything that runs the model (caching, interventions,
patching, generation) goes through ``tokenize`` and ``forward`` here.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from interp.errors import InputError
from interp.models.arch import Arch
from interp.models.hooks import replace_hidden_input
from interp.models.sites import SiteInfo, SiteTable

if TYPE_CHECKING:
    from interp.cache import ActivationCache
    from interp.intervene import Intervention

SiteSpec = str | Iterable[str] | Callable[[str], bool] | None
TokenInput = Any  # str | list[str] | Tensor | list[list[int]] | Mapping | Tokens


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str
    backend: Literal["hf", "transformer_lens"]
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_vocab: int


@dataclass
class Tokens:
    """Token ids [batch, pos] and the attention mask (1 = real token; None when nothing is padded)."""

    ids: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.ids.shape

    def real(self) -> torch.Tensor:
        """Boolean [batch, pos]: which entries are real tokens."""
        return torch.ones_like(self.ids, dtype=torch.bool) if self.mask is None else self.mask.bool()

    def take(self, rows: torch.Tensor) -> Tokens:
        """Prompts ``rows`` (repeats allowed), with their mask."""
        return Tokens(self.ids[rows], None if self.mask is None else self.mask[rows])


@dataclass
class PastKeys:
    """Every layer's attention keys and values from one run, to continue runs after a shared prefix."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    seq_dim: int  # the position dimension of the backend's layout

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[self.seq_dim])

    def take(self, rows: torch.Tensor, length: int, first_layer: int = 0) -> PastKeys:
        """The first ``length`` positions of prompts ``rows``.

        Layers before ``first_layer`` (which a run starting there never reads) keep every prompt
        and only the position count right, without a copy.
        """
        rows = rows.to(self.keys[0].device)

        def pick(layer: int, t: torch.Tensor) -> torch.Tensor:
            t = t.narrow(self.seq_dim, 0, length)
            return t if layer < first_layer else t.index_select(0, rows)

        return PastKeys([pick(i, k) for i, k in enumerate(self.keys)], [pick(i, v) for i, v in enumerate(self.values)], self.seq_dim)


class Model:
    """A language model with TransformerLens-style named sites. Build it with ``load_model``."""

    def __init__(self, module: nn.Module, tokenizer: Any, config: ModelConfig, sites: SiteTable):
        self.module = module
        self.tokenizer = tokenizer
        self.cfg = config
        self.site_table = sites
        self.active_interventions = 0  # how many interventions ``intervene`` has attached right now
        self._nnsight = None

    # ------------------------------------------------------------------ sites
    def sites(self) -> list[SiteInfo]:
        """Every site with its shape, in the order the forward pass computes them."""
        return self.site_table.infos()

    def site_names(self, spec: SiteSpec = None) -> list[str]:
        """Resolve a name, glob, list, predicate or None (all) into site names, validated."""
        return self.site_table.resolve(spec)

    def site(self, kind: str, layer: int | None = None) -> str:
        """The full name of a site: ``model.site("resid_post", 12)`` -> ``blocks.12.hook_resid_post``."""
        return self.site_table.name_of(kind, layer)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    # ------------------------------------------------------------ tokenizing
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        for candidate in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if candidate is not None:
                return int(candidate)
        return 0

    def tokenize(
        self,
        inputs: TokenInput,
        *,
        prepend_bos: bool | None = None,
        padding_side: Literal["right", "left"] = "right",
    ) -> Tokens:
        """Turn text, token ids or a tokenizer output into ``Tokens`` on the model's device.

        ``prepend_bos=None`` keeps the tokenizer's own behaviour (SmolLM2 adds no BOS; the
        sanity value "The capital of France is" -> " Paris", p ~ 0.77, is without one).
        Batches of unequal length are padded on ``padding_side``.
        """
        if isinstance(inputs, Tokens):
            return Tokens(inputs.ids.to(self.device), None if inputs.mask is None else inputs.mask.to(self.device))
        if isinstance(inputs, Mapping):
            ids = torch.as_tensor(inputs["input_ids"])
            mask = inputs.get("attention_mask")
            mask = None if mask is None or bool(torch.as_tensor(mask).all()) else torch.as_tensor(mask)
            return Tokens(ids.to(self.device), None if mask is None else mask.to(self.device))
        if isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.ndim == 2 else inputs.unsqueeze(0)
            return Tokens(ids.long().to(self.device))
        if isinstance(inputs, str):
            inputs = [inputs]
        rows = [self._encode(x, prepend_bos) if isinstance(x, str) else list(x) for x in inputs]
        if not rows or any(len(r) == 0 for r in rows):
            raise InputError("cannot run the model on an empty input (a text tokenized to no tokens)")
        return self._pad(rows, padding_side)

    def _encode(self, text: str, prepend_bos: bool | None) -> list[int]:
        if self.tokenizer is None:
            raise InputError(f"{self.cfg.name} has no tokenizer; pass token ids instead of text")
        ids = list(self.tokenizer(text)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        elif prepend_bos is False and ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        return ids

    def _pad(self, rows: list[list[int]], side: str) -> Tokens:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        padded = bool((mask == 0).any())
        return Tokens(ids.to(self.device), mask.to(self.device) if padded else None)

    def to_str_tokens(self, inputs: TokenInput, **kwargs: Any) -> list[str] | list[list[str]]:
        """Each token as text; one list per row for a batch."""
        ids = self.tokenize(inputs, **kwargs).ids
        rows = [[self.tokenizer.decode([int(t)]) for t in row] for row in ids]
        return rows[0] if len(rows) == 1 and (isinstance(inputs, str) or getattr(inputs, "ndim", 2) == 1) else rows

    def to_string(self, ids: torch.Tensor | Sequence[int]) -> str:
        return self.tokenizer.decode([int(t) for t in torch.as_tensor(ids).flatten()])

    # --------------------------------------------------------------- running
    def forward(self, inputs: TokenInput, **kwargs: Any) -> torch.Tensor:
        """Logits [batch, pos, vocab]. Interventions active in ``intervene`` apply."""
        tokens = self.tokenize(inputs, **kwargs)
        return self._logits(tokens)

    __call__ = forward

    def _logits(self, tokens: Tokens) -> torch.Tensor:
        raise NotImplementedError

    def forward_from(self, layer: int, resid: torch.Tensor, tokens: Tokens, *, last_only: bool = False,
                     past: PastKeys | None = None) -> torch.Tensor:
        """Logits of running blocks ``layer..`` on ``resid`` (= blocks.{layer}.hook_resid_pre), skipping the rest.

        ``tokens`` give the attention mask. Interventions active in ``intervene`` apply (from
        ``blocks.{layer}.hook_resid_pre`` on). ``last_only`` computes the last position's logits
        only. With ``past`` (keys and values of the first ``past.length`` positions, from
        ``past_keys``), ``resid`` holds only the positions after them: in a causal model nothing
        before a change needs recomputing.
        """
        if not 0 <= layer < self.cfg.n_layers:
            raise InputError(f"layer {layer} out of range 0..{self.cfg.n_layers - 1}")
        return self._forward_from(layer, resid, tokens, last_only, past)

    def _forward_from(self, layer: int, resid: torch.Tensor, tokens: Tokens, last_only: bool, past: PastKeys | None) -> torch.Tensor:
        raise NotImplementedError

    def past_keys(self, inputs: TokenInput) -> PastKeys:
        """Keys and values of every layer for ``inputs`` (one forward pass, no gradients)."""
        with torch.no_grad():
            return self._past_keys(self.tokenize(inputs))

    def _past_keys(self, tokens: Tokens) -> PastKeys:
        raise NotImplementedError

    def loss(self, inputs: TokenInput, *, per_token: bool = False, **kwargs: Any) -> torch.Tensor:
        """Next-token cross-entropy in nats: the mean over real tokens, or [batch, pos-1]."""
        tokens = self.tokenize(inputs, **kwargs)
        return token_cross_entropy(self._logits(tokens), tokens, per_token=per_token)

    def run_with_cache(self, inputs: TokenInput, sites: SiteSpec = None, **kwargs: Any) -> ActivationCache:
        """Run once and keep the activations at ``sites``; see ``interp.cache.run_with_cache``."""
        from interp.cache import run_with_cache

        return run_with_cache(self, inputs, sites, **kwargs)

    def intervene(self, *interventions: Intervention) -> contextlib.AbstractContextManager[None]:
        """Context manager: the interventions act on every forward pass (and generation) inside it."""
        from interp.intervene import intervening

        return intervening(self, interventions)

    def generate(
        self,
        prompts: str | Sequence[str],
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        interventions: Sequence[Intervention] = (),
        prepend_bos: bool | None = None,
    ) -> list[str]:
        """Continue each prompt (greedy when ``temperature == 0``); returns only the new text."""
        _, new = self.generate_tokens(prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                      interventions=interventions, prepend_bos=prepend_bos)
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    def generate_tokens(
        self,
        prompts: TokenInput,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        interventions: Sequence[Intervention] = (),
        prepend_bos: bool | None = None,
    ) -> tuple[Tokens, torch.Tensor]:
        """``generate`` as token ids: the left-padded prompts and the new tokens [batch, new]
        (rows that stop early are padded with the pad token after their end-of-sequence token)."""
        tokens = self.tokenize(prompts, prepend_bos=prepend_bos, padding_side="left")
        with self.intervene(*interventions), torch.no_grad(), _seeded(seed):
            out = self._generate_ids(tokens, max_new_tokens, temperature, top_p)
        return tokens, out[:, tokens.ids.shape[1] :]

    def _generate_ids(self, tokens: Tokens, max_new_tokens: int, temperature: float, top_p: float) -> torch.Tensor:
        raise NotImplementedError

    def cache_offset(self, args: tuple, kwargs: dict) -> int:
        """How many tokens of this sequence earlier forward passes already processed (KV cache)."""
        raise NotImplementedError

    def mlp(self, layer: int) -> nn.Module:
        """Block ``layer``'s MLP module: normalised residual [batch, pos, d_model] in, the same shape out."""
        raise NotImplementedError

    def mlp_norm(self, layer: int) -> nn.Module:
        """The norm whose output block ``layer``'s MLP reads (``nn.Identity`` where it reads the residual stream)."""
        raise NotImplementedError

    def mlp_branch(self, layer: int) -> nn.Module:
        """Block ``layer``'s MLP branch: ``hook_resid_mid`` in, ``hook_mlp_out`` out (norm, MLP, post-norm)."""
        raise NotImplementedError

    # ---------------------------------------------------------- unembedding
    @property
    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Module:
        raise NotImplementedError

    def unembed(self, resid: torch.Tensor, *, apply_norm: bool = True) -> torch.Tensor:
        """Logits from a residual-stream vector (through the final norm unless ``apply_norm=False``),
        with whatever the model does after its unembedding (logit scaling, soft-capping)."""
        return self._logit_transform(self.lm_head(self.final_norm(resid) if apply_norm else resid))

    def _logit_transform(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    # --------------------------------------------------------------- nnsight
    @property
    def nnsight(self) -> Any:
        """An nnsight model over the same module tree (same weights, no copy)."""
        if self._nnsight is None:
            self._nnsight = self._make_nnsight()
        return self._nnsight

    def _make_nnsight(self) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"Model({c.name!r}, family={c.family}, layers={c.n_layers}, d_model={c.d_model}, "
            f"d_mlp={c.d_mlp}, heads={c.n_heads}, sites={len(self.site_table)}, device={self.device})"
        )


class HFModel(Model):
    """A ``transformers`` causal LM."""

    def __init__(self, module: nn.Module, tokenizer: Any, config: ModelConfig, sites: SiteTable, arch: Arch):
        super().__init__(module, tokenizer, config, sites)
        self.arch = arch

    def _logits(self, tokens: Tokens) -> torch.Tensor:
        return self.module(input_ids=tokens.ids, attention_mask=tokens.mask, use_cache=False).logits

    def _past_keys(self, tokens: Tokens) -> PastKeys:
        from transformers import DynamicCache

        # A cache without the config keeps every position in every layer (the model's own would keep
        # only the window of sliding-window layers); the masks still apply the window.
        cache = DynamicCache()
        self.module(input_ids=tokens.ids, attention_mask=tokens.mask, use_cache=True, **{self._cache_kwarg: cache})
        return PastKeys([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], seq_dim=2)

    def _forward_from(self, layer: int, resid: torch.Tensor, tokens: Tokens, last_only: bool, past: PastKeys | None) -> torch.Tensor:
        # The model's own forward on a shortened layer list, so everything else (rotary positions,
        # masks, final norm) is its own code. ``resid`` goes in as inputs_embeds for the shapes, and
        # becomes the first block's input exactly: whatever the model does to its embeddings (GPT-2's
        # positions, Gemma's scaling) is replaced, not undone. Attention modules keep their
        # layer_idx, so a cache holding every layer lines up.
        from transformers import DynamicCache

        parent_path, _, name = self.arch.layers.rpartition(".")
        parent = self.module.get_submodule(parent_path)
        layers, config = getattr(parent, name), self.module.config
        saved = {"num_hidden_layers": config.num_hidden_layers, "layer_types": getattr(config, "layer_types", None)}
        cache = DynamicCache(list(zip(past.keys, past.values, strict=True))) if past is not None else None

        def substitute(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return replace_hidden_input(args, kwargs, resid)

        # Before any intervention at this block's resid_pre, which must see ``resid``.
        handle = layers[layer].register_forward_pre_hook(substitute, with_kwargs=True, prepend=True)
        try:
            setattr(parent, name, nn.ModuleList(list(layers)[layer:]))
            config.num_hidden_layers = len(layers) - layer
            if isinstance(saved["layer_types"], list):
                config.layer_types = saved["layer_types"][layer:]
            out = self.module(inputs_embeds=resid, attention_mask=tokens.mask, **{self._cache_kwarg: cache},
                              use_cache=cache is not None, logits_to_keep=1 if last_only else 0)
        finally:
            handle.remove()
            setattr(parent, name, layers)
            config.num_hidden_layers = saved["num_hidden_layers"]
            if isinstance(saved["layer_types"], list):
                config.layer_types = saved["layer_types"]
        return out.logits

    def _generate_ids(self, tokens: Tokens, max_new_tokens: int, temperature: float, top_p: float) -> torch.Tensor:
        from transformers import GenerationConfig

        sample = temperature > 0
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=temperature if sample else None,
            top_p=top_p if sample else None,
            top_k=None,
            pad_token_id=self.pad_token_id,
            eos_token_id=getattr(self.tokenizer, "eos_token_id", None),
        )
        mask = tokens.mask if tokens.mask is not None else torch.ones_like(tokens.ids)
        return self.module.generate(input_ids=tokens.ids, attention_mask=mask, generation_config=config)

    def cache_offset(self, args: tuple, kwargs: dict) -> int:
        past = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x renames past_key_values to cache
        return int(past.get_seq_length()) if past is not None else 0

    @property
    def _cache_kwarg(self) -> str:
        """The forward's name for the KV cache: ``cache`` in recent transformers, ``past_key_values`` before."""
        return "cache" if "cache" in inspect.signature(self.module.forward).parameters else "past_key_values"

    def mlp(self, layer: int) -> nn.Module:
        return self._block_module(layer, self.arch.mlp)

    def mlp_norm(self, layer: int) -> nn.Module:
        return self._block_module(layer, self.arch.ln2)

    def mlp_branch(self, layer: int) -> nn.Module:
        return nn.Sequential(self.mlp_norm(layer), self.mlp(layer), self._block_module(layer, self.arch.ln2_post))

    def _block_module(self, layer: int, path: str | None) -> nn.Module:
        return self.module.get_submodule(f"{self.arch.layers}.{layer}.{path}") if path else nn.Identity()

    def _logit_transform(self, logits: torch.Tensor) -> torch.Tensor:
        from interp.models.structure import transform_logits

        return transform_logits(self.arch, logits)

    @property
    def final_norm(self) -> nn.Module:
        return self.module.get_submodule(self.arch.final_norm)

    @property
    def lm_head(self) -> nn.Module:
        return self.module.get_output_embeddings()

    def _make_nnsight(self) -> Any:
        import nnsight

        # nnsight re-configures the tokenizer it is given (padding side), so it gets a copy.
        return nnsight.TransformersModel(self.module, tokenizer=copy.deepcopy(self.tokenizer), task="text-generation")


class TLModel(Model):
    """A TransformerLens ``HookedTransformer``, used through its own hook points."""

    def _logits(self, tokens: Tokens) -> torch.Tensor:
        return self.module(tokens.ids, attention_mask=tokens.mask)

    def _past_keys(self, tokens: Tokens) -> PastKeys:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        cache = TransformerLensKeyValueCache.init_cache(self.module.cfg, self.device, tokens.ids.shape[0])
        mask = tokens.mask if tokens.mask is not None else torch.ones_like(tokens.ids)  # TL wants one with a cache
        self.module(tokens.ids, attention_mask=mask, past_kv_cache=cache)
        return PastKeys([e.past_keys for e in cache.entries], [e.past_values for e in cache.entries], seq_dim=1)

    def _forward_from(self, layer: int, resid: torch.Tensor, tokens: Tokens, last_only: bool, past: PastKeys | None) -> torch.Tensor:
        cache = None
        if past is not None:
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
            from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

            entries = [TransformerLensKeyValueCacheEntry(k, v) for k, v in zip(past.keys, past.values, strict=True)]
            mask = torch.ones(resid.shape[0], past.length, dtype=torch.long, device=resid.device)
            cache = TransformerLensKeyValueCache(entries=entries, previous_attention_mask=mask)
        if last_only and not self.module.cfg.output_logits_soft_cap > 0:  # unembed the last position only (as HF's logits_to_keep)
            resid = self.module(resid, start_at_layer=layer, stop_at_layer=self.cfg.n_layers, tokens=tokens.ids,
                                attention_mask=tokens.mask, past_kv_cache=cache)
            return self.lm_head(self.final_norm(resid)[:, -1:])
        logits = self.module(resid, start_at_layer=layer, tokens=tokens.ids, attention_mask=tokens.mask, past_kv_cache=cache)
        return logits[:, -1:] if last_only else logits

    def _generate_ids(self, tokens: Tokens, max_new_tokens: int, temperature: float, top_p: float) -> torch.Tensor:
        if tokens.mask is not None:
            raise InputError("TransformerLens generation here takes prompts of equal token length")
        return self.module.generate(
            tokens.ids,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else 1.0,
            top_p=top_p,
            verbose=False,
            stop_at_eos=False,
        )

    def cache_offset(self, args: tuple, kwargs: dict) -> int:
        past = kwargs.get("past_kv_cache")
        if past is None or not past.entries or past.entries[0].past_keys is None:
            return 0
        return int(past.entries[0].past_keys.shape[1])

    def mlp(self, layer: int) -> nn.Module:
        return self.module.blocks[layer].mlp

    def mlp_norm(self, layer: int) -> nn.Module:
        return self.module.blocks[layer].ln2

    def mlp_branch(self, layer: int) -> nn.Module:
        block = self.module.blocks[layer]
        return nn.Sequential(block.ln2, block.mlp, getattr(block, "ln2_post", None) or nn.Identity())

    @property
    def final_norm(self) -> nn.Module:
        return self.module.ln_final if getattr(self.module, "ln_final", None) is not None else nn.Identity()

    @property
    def lm_head(self) -> nn.Module:
        return _TLUnembed(self.module.unembed)

    def _logit_transform(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.module.cfg.output_logits_soft_cap
        return torch.tanh(logits / cap) * cap if cap > 0 else logits

    def _make_nnsight(self) -> Any:
        import nnsight

        return nnsight.NNsight(self.module)


class _TLUnembed(nn.Module):
    """TransformerLens's unembedding with its hook points, minus the copy of W_U.T its forward
    makes on every call (51 MB for a 50k vocabulary, more than the product for a few positions)."""

    def __init__(self, unembed: nn.Module):
        super().__init__()
        self.unembed = unembed

    def forward(self, resid: torch.Tensor) -> torch.Tensor:
        u = self.unembed
        return u.hook_out(nn.functional.linear(u.hook_in(resid), u.W_U.T, u.b_U))


def token_cross_entropy(logits: torch.Tensor, tokens: Tokens, *, per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy (nats) of ``logits`` against ``tokens``; pads are ignored."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logprobs.gather(-1, tokens.ids[:, 1:, None]).squeeze(-1)
    real = tokens.real()[:, 1:]
    if per_token:
        return nll.masked_fill(~real, float("nan"))
    return nll[real].mean()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
