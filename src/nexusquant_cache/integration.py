"""The only module that touches transformers internals.

- Query capture: attention-aware scorers need each layer's real (post-RoPE) queries, which a
  cache never sees. We register an attention function, ``"nexusquant"``, that hands the query
  to the layer whose ``update`` just ran (matched by the identity of the key tensor it returned)
  and then runs transformers' own SDPA attention. For a decode step, ``update`` returned only
  the full-precision window (it checked :class:`AttentionRoute` first), and the function lets
  the layer attend to its old tokens as codes (``NexusQuantLayer.attend``, attention.py)
  instead. A model uses the function only while a cache or a ``nexusquant_evict`` block needs
  it; its previous attention implementation is restored afterwards.
- ``nexusquant_evict(model, ...)``: a context manager that makes ``model.generate`` use a
  NexusQuantCache, restored exactly on exit, also on exceptions.
- ``cache_implementation="nexusquant"``: transformers has no cache registry, so
  :func:`accept_cache_implementation` adds the name to the list ``GenerationConfig.validate``
  accepts and :func:`build_cache_for_its_name` wraps ``GenerationMixin._prepare_cache_for_generation``
  to build a NexusQuantCache for that name. ``import nexusquant_cache`` runs each right after
  transformers loads the module it patches (at once if it already has): the package's one
  import-time side effect. Both are idempotent.

- Rotary embeddings: key conditioning reads each layer's RoPE frequencies from the model's
  ``rotary_emb`` module (:func:`rotary_embeddings`).

This module imports nothing of transformers (nor torch) at import: the package imports it to
set up those two steps, and every function here imports what it touches when it runs.
"""

from __future__ import annotations

import functools
import threading
import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import TYPE_CHECKING, Callable, Iterator

from .config import NexusQuantConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "ATTENTION_NAME",
    "AttentionRoute",
    "CACHE_IMPLEMENTATION",
    "accept_cache_implementation",
    "build_cache_for_its_name",
    "capture_queries",
    "nexusquant_evict",
    "rotary_embeddings",
]

ATTENTION_NAME = "nexusquant"
CACHE_IMPLEMENTATION = "nexusquant"


@functools.cache
def _register_attention() -> None:
    """Add the query-capturing attention function (and SDPA's mask) to transformers' registries
    under ATTENTION_NAME, once; this changes nothing for models that do not select it."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .layer import PENDING_LAYER

    def attention(module, query, key, value, attention_mask, **kwargs):
        pending = PENDING_LAYER.get()
        if pending is not None and pending[1] is key:
            PENDING_LAYER.set(None)
            layer, scaling = pending[0], kwargs.get("scaling") or query.shape[-1] ** -0.5
            layer.route_checked(key)
            causal = kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
            if layer.handed_window(key):  # a decode step: the old tokens are read as codes
                unsupported = [name for name in ("softcap", "position_bias", "s_aux") if kwargs.get(name) is not None]
                if unsupported:
                    raise NotImplementedError(f"NexusQuantCache's attention does not support {unsupported}")
                dropout = kwargs.get("dropout", 0.0)
                return layer.attend(query, key, value, attention_mask, scaling, dropout=dropout, causal=causal), None
            attention_mask = layer.biased_mask(attention_mask, query, causal)
            layer.observe(query, key, attention_mask, scaling)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def rotary_embeddings(model: PreTrainedModel) -> list:
    """Per decoder layer, the model's rotary embedding as a :class:`~nexusquant_cache.conditioning.Rope`,
    or None where there is none we can trust (key conditioning then removes a plain mean): the
    frequencies of the ``rotary_emb`` module, per layer type where it has several (Gemma 3),
    each checked against the model's own ``apply_rotary_pos_emb`` on a probe (a model that
    rotates other channel pairs, Cohere's or GLM's interleaved ones, fails it). Layers whose
    attention applies no RoPE (``use_rope`` false: SmolLM3's and Llama 4's NoPE layers) and
    dynamic RoPE (frequencies that change with the length) get None. Conditioning only needs the
    RoPE to be right to remove the offset well: it adds back exactly what it took away."""
    import sys

    from .conditioning import Rope

    text_config = model.config.get_text_config(decoder=True)
    layers = text_config.num_hidden_layers
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model  # not a vision tower's
    module = next((m for name, m in decoder.named_modules() if name.rsplit(".", 1)[-1] == "rotary_emb"), None)
    layer_modules = getattr(decoder, "layers", None) or getattr(decoder, "h", None) or []
    names = ("self_attn", "attention", "self_attention")  # Llama and most; GPT-NeoX; Falcon
    attentions = [next((getattr(m, n) for n in names if hasattr(m, n)), None) for m in layer_modules]
    if module is None or len(attentions) != layers or any(attention is None for attention in attentions):
        return [None] * layers
    apply = getattr(sys.modules.get(type(attentions[0]).__module__), "apply_rotary_pos_emb", None)
    layer_types = getattr(text_config, "layer_types", None) or ["full_attention"] * layers
    ropes, checked = [], {}
    for layer_type, attention in zip(layer_types, attentions):
        if layer_type not in checked:
            checked[layer_type] = _checked_rope(module, layer_type, apply, head_dim)
        rope = checked[layer_type] if getattr(attention, "use_rope", True) else None
        # Each layer its own copy: files hold every layer's tensors apart (safetensors refuses shared memory).
        ropes.append(None if rope is None else Rope(rope.inv_freq.clone(), rope.scaling))
    return ropes


def _checked_rope(module, layer_type: str, apply, head_dim: int):
    """The Rope of ``layer_type`` read from the ``rotary_emb`` ``module``, if the model's
    ``apply`` rotates a probe the same way; else None."""
    import torch

    from .conditioning import Rope

    inv_freq = getattr(module, f"{layer_type}_inv_freq", None)
    per_type = inv_freq is not None  # Gemma 3: one RoPE per layer type, chosen by an argument
    scaling = getattr(module, f"{layer_type}_attention_scaling", None)
    rope_type = getattr(module, "rope_type", None)
    if not per_type:
        inv_freq, scaling = getattr(module, "inv_freq", None), getattr(module, "attention_scaling", 1.0)
    elif isinstance(rope_type, dict):
        rope_type = rope_type.get(layer_type)
    usable = isinstance(inv_freq, torch.Tensor) and inv_freq.dim() == 1 and 0 < 2 * len(inv_freq) <= head_dim
    if not usable or apply is None or "dynamic" in str(rope_type):
        return None
    rope = Rope(inv_freq.detach().float().clone(), float(scaling or 1.0))
    positions = torch.arange(100, 108, device=inv_freq.device)[None]  # far from 0: every frequency turns
    probe = torch.randn(1, 1, 8, head_dim, generator=torch.Generator().manual_seed(0)).to(inv_freq.device)
    try:
        with torch.no_grad():
            cos, sin = module(probe, positions, **({"layer_type": layer_type} if per_type else {}))
            # Partial RoPE: some models split the rotated channels off before calling apply (Phi,
            # StableLM), so the probe is as wide as cos: all of it rotates.
            probe = probe[..., : cos.shape[-1]]
            rotated = apply(probe, probe, cos, sin)[1].float()
            expected = rope.apply(probe, positions[None]).to(rotated.device)
            same = rotated.shape == expected.shape and torch.allclose(rotated, expected, atol=1e-4, rtol=1e-4)
    except Exception:  # a signature of its own (multimodal RoPE, ...), weights not on a device: not a RoPE we know
        return None
    return rope if same else None


# The ids of the captured models whose forward is running in this thread or asyncio task.
_RUNNING: ContextVar[tuple[int, ...]] = ContextVar("nexusquant_running", default=())


def _entered(module, args) -> None:
    _RUNNING.set((*_RUNNING.get(), id(module)))


def _left(module, args, output) -> None:
    running = _RUNNING.get()
    if id(module) in running:
        last = len(running) - 1 - running[::-1].index(id(module))
        _RUNNING.set(running[:last] + running[last + 1 :])


class AttentionRoute:
    """Whether ``model``'s attention runs through the query-capturing function right now: its
    forward is running (a hook of the capture says so; not another instance's, nor a direct call
    of the cache) and its config names the function (every attention module reads it at each
    forward). Holds the model weakly; a deep copy shares it, an unpickled cache has none."""

    def __init__(self, model: PreTrainedModel):
        self._model, self._id = weakref.ref(model), id(model)

    def __call__(self) -> bool:
        model = self._model()
        running = model is not None and self._id in _RUNNING.get()
        return running and model.config._attn_implementation == ATTENTION_NAME

    def __deepcopy__(self, memo: dict) -> "AttentionRoute":
        return self

    def __reduce__(self):
        return _no_route, ()


def _no_route() -> None:
    return None


# id(model) -> [weak reference to the model, its previous attention implementation, users, id(model),
# its forward hooks]
_CAPTURING: dict[int, list] = {}
# Caches are built and collected on any thread, and a collection runs its finalizer wherever
# the garbage collector happens to run: a release that finds the lock taken is queued, and
# whoever holds the lock (or next takes it) carries it out.
_LOCK = threading.Lock()
_QUEUED: list[list] = []


def capture_queries(model: PreTrainedModel) -> Callable[[], None] | None:
    """Route ``model``'s attention through the query-capturing function until the returned
    release function is called (idempotent; the last user restores the previous implementation,
    unless the model was switched to another one meanwhile). Safe to use from several threads.

    Returns None when the model cannot use it: a model that cannot switch its attention
    implementation, or one whose attention SDPA does not compute (``_supports_sdpa`` false, as
    GPT-OSS with its learned sinks; attention softcapping): capture must never change the logits.
    """
    text_config = model.config.get_text_config(decoder=True)
    if not getattr(model, "_supports_sdpa", False) or getattr(text_config, "attn_logit_softcapping", None) is not None:
        return None
    _register_attention()
    key = id(model)
    with _locked():
        entry = _CAPTURING.get(key)
        if entry is not None and entry[0]() is model and model.config._attn_implementation != ATTENTION_NAME:
            return None  # its user switched the attention while our caches live: their choice stands
        if entry is None or entry[0]() is not model:  # a new model, or a dead one's id reused
            previous = model.config._attn_implementation
            model.set_attn_implementation(ATTENTION_NAME)
            if model.config._attn_implementation != ATTENTION_NAME:
                return None
            # While the model's forward runs, its id is in _RUNNING (AttentionRoute reads it).
            hooks = (model.register_forward_pre_hook(_entered), model.register_forward_hook(_left, always_call=True))
            entry = _CAPTURING[key] = [weakref.ref(model), previous, 0, key, hooks]
        entry[2] += 1
    released = [False]

    def release() -> None:
        if not released[0]:
            released[0] = True
            _QUEUED.append(entry)
            _run_queued()

    return release


@contextmanager
def _locked() -> Iterator[None]:
    with _LOCK:
        yield
    _run_queued()


def _run_queued() -> None:
    """Carry out the queued releases, unless another thread holds the lock (it will)."""
    while _QUEUED and _LOCK.acquire(blocking=False):
        try:
            while _QUEUED:
                entry = _QUEUED.pop()
                entry[2] -= 1
                if entry[2] == 0:
                    if _CAPTURING.get(entry[3]) is entry:
                        del _CAPTURING[entry[3]]
                    for hook in entry[4]:
                        hook.remove()
                    owner = entry[0]()
                    if owner is not None and owner.config._attn_implementation == ATTENTION_NAME:
                        owner.set_attn_implementation(entry[1])
        finally:
            _LOCK.release()


# The nexusquant_evict blocks open in this thread or asyncio task: (model, config, block), innermost last.
_OPEN_BLOCKS: ContextVar[tuple] = ContextVar("nexusquant_evict_blocks", default=())
# id(model) -> [weak reference to the model, the generate it had in its own __dict__ or None, open blocks]
_PATCHED: dict[int, list] = {}


@contextmanager
def nexusquant_evict(
    model: PreTrainedModel, config: NexusQuantConfig | None = None, **fields
) -> Iterator[PreTrainedModel]:
    """Inside the block, ``model.generate`` uses a fresh NexusQuantCache per call.

    Pass a ``NexusQuantConfig``, a dict of its fields, or the fields (``nexusquant_evict(model,
    key_bits=3, keep_ratio=0.5)``). A call that passes its own cache keeps it. Direct forward calls are not
    affected. The block applies to ``generate`` calls of its own thread or asyncio task: blocks
    in other threads or tasks may overlap it in any order, and each call sees only its own.
    When the last block on a model closes, the model is as it was, also on exceptions.
    """
    from .cache import NexusQuantCache
    from .layer import ATTENTION_SCORERS

    if config is not None and fields:
        raise ValueError("pass either `config` or its fields, not both")
    if not hasattr(model, "generate"):
        raise TypeError(f"`model` must be a transformers model with `generate`, not {type(model).__name__}")
    if isinstance(config, dict):
        config = NexusQuantConfig.from_dict(config)
    elif config is None:
        config = NexusQuantConfig(**fields)
    elif not isinstance(config, NexusQuantConfig):
        raise TypeError(
            f"`config` must be a NexusQuantConfig (e.g. NexusQuantConfig.preset('max')) or a dict of its fields, "
            f"not {type(config).__name__}"
        )
    block = [True]  # open; a task that copied this context while it was open sees it close
    with _locked():
        patch = _PATCHED.get(id(model))
        if patch is None or patch[0]() is not model:
            own = vars(model).get("generate")
            unbound = type(model).generate
            reference = weakref.ref(model)

            def generate(*args, **kwargs):
                owner = reference()
                blocks = reversed(_OPEN_BLOCKS.get())
                chosen = next((c for m, c, block in blocks if m is owner and block[0]), None)
                if chosen is not None and kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
                    kwargs["cache"] = NexusQuantCache(chosen, model=owner)
                return (own or unbound.__get__(owner))(*args, **kwargs)

            patch = _PATCHED[id(model)] = [reference, own, 0]
            model.generate = generate
        patch[2] += 1
    release = capture_queries(model) if config.ranks and config.scorer in ATTENTION_SCORERS else None
    _OPEN_BLOCKS.set((*_OPEN_BLOCKS.get(), (model, config, block)))
    try:
        yield model
    finally:
        # Not reset(): blocks of one context may also close out of order.
        block[0] = False
        _OPEN_BLOCKS.set(tuple(entry for entry in _OPEN_BLOCKS.get() if entry[2] is not block))
        with _locked():
            patch[2] -= 1
            if patch[2] == 0:
                del _PATCHED[id(model)]
                if patch[1] is not None:
                    model.generate = patch[1]
                else:
                    vars(model).pop("generate", None)
        if release is not None:
            release()


def accept_cache_implementation(configuration_utils: ModuleType) -> None:
    """Add the name to the list ``GenerationConfig.validate`` accepts, in transformers'
    ``generation.configuration_utils`` module just loaded."""
    if CACHE_IMPLEMENTATION not in configuration_utils.ALL_CACHE_IMPLEMENTATIONS:
        configuration_utils.ALL_CACHE_IMPLEMENTATIONS += (CACHE_IMPLEMENTATION,)


def build_cache_for_its_name(generation_utils: ModuleType) -> None:
    """Wrap ``GenerationMixin._prepare_cache_for_generation`` of transformers' ``generation.utils``
    module just loaded: for the name, build a NexusQuantCache from ``generation_config.cache_config``;
    every other value goes through untouched. Imports nothing: it runs inside transformers' import."""
    mixin = generation_utils.GenerationMixin
    original = mixin._prepare_cache_for_generation
    if getattr(original, "_nexusquant", False):
        return

    @functools.wraps(original)
    def prepare_cache(self, generation_config, model_kwargs, *args, **kwargs):
        if generation_config.cache_implementation != CACHE_IMPLEMENTATION or model_kwargs.get("cache") is not None:
            return original(self, generation_config, model_kwargs, *args, **kwargs)  # also reports conflicts
        from .cache import NexusQuantCache

        config = generation_config.cache_config or {}
        if not isinstance(config, NexusQuantConfig):
            config = NexusQuantConfig.from_dict(config)
        model_kwargs["cache"] = NexusQuantCache(config, model=self)

    prepare_cache._nexusquant = True
    mixin._prepare_cache_for_generation = prepare_cache
