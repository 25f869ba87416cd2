"""Text generation with a key/value cache: ``plait.generate`` and the cache models write into.

The model-side contract (for third-party model authors too): a model that generates
incrementally takes the cache as a keyword, ``model(tokens[B, T], cache=cache) ->
logits[B, T, V]``. Each call appends ``T`` columns to the cache (``cache.append(T)``),
and each attention layer reads its own view, ``cache.layer(key)``, which gives

- ``positions`` ``[B, T]``: the RoPE position of each new token, counted from each row's
  first real token (left padding takes no positions);
- ``mask`` ``[B, 1, T, length]`` (bool, True = attend): causal, never a padded column;
- ``update(name=tensor, ...)``: stores each new tensor (sequence on dimension -2, e.g.
  keys ``[B, kv_heads, T, head_dim]`` or a latent ``[B, T, rank]``) in a buffer of
  ``max_len`` columns allocated at the first write, at the new columns (no concatenation),
  and returns every column so far, in the order given.

A layer caches what it wants under names of its own: grouped-query attention its keys
and values, multi-head latent attention its compressed latent and rotary key. A model
whose forward has no ``cache`` keyword still generates, by recomputing the whole
sequence at every token (and only unpadded batches).
"""
from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence

import torch
from torch import nn


class KVCache:
    """The generation state of one batch: which columns hold real tokens, how many are
    filled, and each layer's stored tensors (preallocated to ``max_len`` columns).

    ``attention_mask`` ``[B, S]`` (1 = token, 0 = padding) marks the padding of the
    prompt, the first ``S`` columns; later columns are always real.
    """

    def __init__(self, *, batch_size: int, max_len: int, device: torch.device | str,
                 attention_mask: torch.Tensor | None = None) -> None:  # fmt: skip
        self.max_len = max_len
        self.valid = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            self.valid[:, : attention_mask.shape[1]] = attention_mask.bool()
        self.length = 0
        self.start = 0
        self.positions = torch.empty(batch_size, 0, dtype=torch.long, device=device)
        self.mask = torch.empty(batch_size, 1, 0, 0, dtype=torch.bool, device=device)
        self._layers: dict[Hashable, dict[str, torch.Tensor]] = {}

    def append(self, num_tokens: int) -> None:
        """Start a forward call over ``num_tokens`` new columns: sets ``positions`` and ``mask``."""
        start, end = self.length, self.length + num_tokens
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} columns; cannot append {num_tokens} to {start}")
        valid = self.valid[:, :end]
        self.positions = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
        query = torch.arange(start, end, device=valid.device)[:, None]
        key = torch.arange(end, device=valid.device)[None, :]
        # a padded query attends to itself only, so its (unused) output stays finite
        self.mask = (((key <= query) & valid[:, None, :]) | (key == query)).unsqueeze(1)
        self.start, self.length = start, end

    def layer(self, key: Hashable) -> LayerCache:
        """The view of layer ``key`` (any hashable, e.g. its name in the block container)."""
        return LayerCache(self, self._layers.setdefault(key, {}))


class LayerCache:
    """One layer's view of a ``KVCache`` during one forward call."""

    def __init__(self, cache: KVCache, store: dict[str, torch.Tensor]) -> None:
        self._cache = cache
        self._store = store

    @property
    def positions(self) -> torch.Tensor:
        return self._cache.positions

    @property
    def mask(self) -> torch.Tensor:
        return self._cache.mask

    def update(self, **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write each tensor at the new columns (its dimension -2) and return every column so far."""
        cache, out = self._cache, []
        for name, tensor in new.items():
            stored = self._store.get(name)
            if stored is None:
                stored = tensor.new_zeros((*tensor.shape[:-2], cache.max_len, tensor.shape[-1]))
                self._store[name] = stored
            stored[..., cache.start : cache.length, :] = tensor
            out.append(stored[..., : cache.length, :])
        return tuple(out)


def supports_cache(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes the ``cache`` keyword (the incremental-decoding contract)."""
    return "cache" in inspect.signature(model.forward).parameters


def _check_options(input_ids: torch.Tensor, max_new_tokens: int, temperature: float | None, top_k: int | None,
                   top_p: float | None, attention_mask: torch.Tensor | None) -> None:  # fmt: skip
    if input_ids.dim() != 2 or input_ids.dtype != torch.long or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty LongTensor [batch, prompt], got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")  # fmt: skip
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape "
                         f"{tuple(input_ids.shape)}")  # fmt: skip


def next_token_scores(logits: torch.Tensor, *, temperature: float | None = None, top_k: int | None = None,
                      top_p: float | None = None, vocab_size: int | None = None) -> torch.Tensor:  # fmt: skip
    """``logits`` ``[B, V]`` -> float32 scores to sample from: ids ``>= vocab_size`` (padding
    rows of a vocabulary larger than the tokenizer's) and those outside top-k / top-p are
    ``-inf``; divided by ``temperature``."""
    scores = logits.float()
    if vocab_size is not None and vocab_size < scores.shape[-1]:
        beyond = torch.arange(scores.shape[-1], device=scores.device) >= vocab_size
        scores = scores.masked_fill(beyond, -torch.inf)
    if temperature:
        scores = scores / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -torch.inf)
    if top_p is not None and top_p < 1:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= top_p)
        scores = scores.masked_fill(drop, -torch.inf)
    return scores


def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    vocab_size: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue ``input_ids`` ``[B, S]`` by up to ``max_new_tokens``: ``[B, S + new]`` (LongTensor).

    Greedy unless ``temperature``, ``top_k`` or ``top_p`` is given (``temperature=0`` is
    greedy whatever else is given); sampling draws from
    a generator seeded with ``seed``. Rows are left-padded batches of prompts when
    ``attention_mask`` (1 = token, 0 = padding) says so. A row that produced an
    ``eos_token_id`` is finished and continues with ``pad_token_id`` (default: the first end
    id); generation stops when every row is finished. ``vocab_size``: the tokenizer's, when
    the model's vocabulary is padded beyond it (larger ids are never produced).
    ``use_cache=False`` recomputes the whole sequence at each token (for checks).

    Runs under ``torch.inference_mode``; the result is an ordinary tensor (usable as the
    input of a forward that needs gradients).
    """
    _check_options(input_ids, max_new_tokens, temperature, top_k, top_p, attention_mask)
    with torch.inference_mode():
        tokens = _generate(model, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, vocab_size=vocab_size, use_cache=use_cache)  # fmt: skip
    return tokens.clone()


def _generate(model: nn.Module, input_ids: torch.Tensor, *, max_new_tokens: int, attention_mask: torch.Tensor | None,
              temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None,
              eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, vocab_size: int | None,
              use_cache: bool) -> torch.Tensor:  # fmt: skip
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    sampling = temperature != 0 and (temperature is not None or top_k is not None or top_p is not None)
    generator = None
    if sampling:
        generator = torch.Generator(device=input_ids.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    cached = supports_cache(model)
    if padded and not cached:
        raise ValueError(f"{type(model).__name__} takes no cache (plait.generation), so it cannot read padded "
                         "batches: generate one prompt at a time")  # fmt: skip

    batch, prompt_len = input_ids.shape
    max_len = prompt_len + max_new_tokens
    tokens = input_ids.new_full((batch, max_len), pad)
    tokens[:, :prompt_len] = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    eos_ids = torch.tensor(eos, dtype=torch.long, device=input_ids.device)

    def fresh_cache() -> KVCache:
        return KVCache(batch_size=batch, max_len=max_len, device=input_ids.device, attention_mask=attention_mask)

    cache = fresh_cache() if cached and use_cache else None
    length = prompt_len
    while length < max_len:
        if cache is not None:
            new = tokens[:, cache.length : length]
            logits = model(new, cache=cache)[:, -1]
        elif cached:  # the same masks and positions, everything recomputed
            logits = model(tokens[:, :length], cache=fresh_cache())[:, -1]
        else:
            logits = model(tokens[:, :length])[:, -1]
        scores = next_token_scores(logits, temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
        if sampling:
            chosen = torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            chosen = scores.argmax(dim=-1)
        chosen = torch.where(finished, torch.full_like(chosen, pad), chosen)
        tokens[:, length] = chosen
        length += 1
        if eos:
            finished |= torch.isin(chosen, eos_ids)
            if bool(finished.all()):
                break
    return tokens[:, :length]
