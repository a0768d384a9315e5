"""NexusQuantConfig: what the cache compresses and how, validated once, frozen."""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

from .codec.choices import SCALE_BITS, SUPPORTED_BITS, Method

__all__ = ["MERGES", "NexusQuantConfig", "PRESETS", "SCORERS"]

CACHE_BITS = (*SUPPORTED_BITS, 16)  # 16: keep that side at full precision
MAX_SEED = 2**63 - 1  # seeds travel as int64 (torch) and JSON integers
# Token importance for eviction; see scoring.py.
SCORERS = ("snapkv", "h2o", "keynorm", "streaming")
# What evicted tokens fold into (policy.py): nothing, the kept token's value, or its key and value.
MERGES = ("off", "values", "keys_values")
# How a layer's 4-bit tokens (full_bits_ratio) are shared among its KV heads.
FULL_BITS_SPLITS = ("head", "layer")
# Points on the measured Pareto front of docs/results.md (SmolLM2-135M, 4k tokens of Emma, 8
# windows), with these exact settings and key conditioning on: real ratio against a 16-bit
# cache, perplexity change.
# `compact` is the most compressed point that evicts nothing (eviction loses copy recall).
_MEASURED_WINDOW = dict(recent_window=32, block_size=32)
PRESETS = {
    "lossless": dict(key_bits=4, value_bits=4, **_MEASURED_WINDOW),  # 3.7x, +0.06%
    "compact": dict(key_bits=4, value_bits=2, **_MEASURED_WINDOW),  # 4.75x, +0.90%
    "balanced": dict(key_bits=4, value_bits=4, keep_ratio=0.5, **_MEASURED_WINDOW),  # 6.6x, +1.8%
    "max": dict(key_bits=4, value_bits=2, keep_ratio=0.25, **_MEASURED_WINDOW),  # 15.6x, +5.0%
    # A byte budget instead of a token fraction: the same ratio on every model (sliding-window
    # layers, guarded layers and padding paid for by eviction). K4V2 beat K4V4 at both budgets
    # on SmolLM2 (prose and code) and Qwen2.5-Coder (docs/results.md, "A byte budget"); 8-bit
    # scales keep 4% more tokens in the same bytes: better at 8x on all three models and both
    # texts, within 0.15 points or better at 16x (docs/results.md, "8-bit scales"). The presets
    # above keep bfloat16 scales: with nothing evicted, 8-bit ones raised KL 6-9% on
    # Qwen2.5-Coder and Gemma 3 for 1-4% of the bytes.
    "8x": dict(key_bits=4, value_bits=2, scale_bits=8, target_ratio=8, **_MEASURED_WINDOW),
    "16x": dict(key_bits=4, value_bits=2, scale_bits=8, target_ratio=16, **_MEASURED_WINDOW),
}


@dataclass(frozen=True)
class NexusQuantConfig:
    """Settings of a :class:`~nexusquant_cache.NexusQuantCache`.

    Attributes:
        key_bits: bits per key number once a token leaves the recent window: 2, 3, 4, or 16 to
            keep keys at full precision.
        value_bits: the same for values.
        recent_window: the newest tokens of every layer kept at full precision (>= 0).
        block_size: tokens are encoded, and evicted, in blocks: when the full-precision part
            reaches ``recent_window + block_size`` tokens, everything older than the window is
            encoded (once; a token is never re-quantized). Larger blocks work less often.
        method: ``"e8"`` (lattice codebooks) or ``"scalar"`` (Lloyd-Max baseline).
        seed: seed of the randomized Hadamard rotation.
        scale_bits: bits of each encoded vector's scale: 16 (bfloat16) or 8 (a log code, 16 steps
            per octave, below a power of two shared by a page of codes; a vector 2^15 to 2^16
            times smaller than the largest held becomes zero). K4V2 at head_dim 64 holds 50 bytes per
            token and head instead of 52: at a byte budget better or within 0.15 points on every
            model measured; with nothing evicted KL rose 6-9% on two of three (docs/results.md,
            "8-bit scales").
        keep_ratio: fraction of the tokens seen that each full-attention layer keeps, in (0, 1];
            1 evicts nothing.
        token_budget: most tokens a full-attention layer keeps (None: no cap).
        target_ratio: a byte budget for the whole cache, as a compression ratio against a 16-bit
            DynamicCache of the same tokens (> 1; None: no byte budget). Each time a block of
            tokens is encoded, every full-attention layer keeps as many tokens as fit the budget
            at the bits set here (sliding-window layers, the window, conditioning, positions and
            scores all counted), evicting the rest by ``scorer``. It cannot go below what a
            layer always holds (``sink_tokens + recent_window + block_size`` tokens), and it
            adds no bytes: where the codes alone compress more, nothing is evicted. All three
            limits (``keep_ratio``, ``token_budget``, ``target_ratio``) apply together.
        full_bits_ratio: fraction of the tokens seen that a full-attention layer holds at its
            full ``key_bits`` / ``value_bits``, in (0, 1]; the other kept tokens, ranked by
            ``scorer`` as eviction ranks them, are *demoted*: a 4-bit E8 side drops the second
            stage of their codes and holds them at 2 bits (not encoded again; tokens only move
            down; sides at other bits are unchanged). 1 demotes nothing. The sinks and the
            full-precision window count against it and are never demoted.
        full_bits_split: how those full-bit tokens are shared among a layer's KV heads:
            ``"head"`` (each head of each batch row keeps the same count, its top-ranked) or
            ``"layer"`` (the top-ranked (head, token) pairs of the batch row, so a head whose
            attention is spread keeps more than one whose attention is concentrated). The same
            bytes either way.
        sink_tokens: the first tokens of the text (by position) are never evicted.
        scorer: how tokens are ranked for eviction: ``"snapkv"`` (attention of the last
            ``observation_window`` queries of every forward, pooled; older votes fade over about
            ``observation_window`` queries, so during decoding it is a windowed H2O), ``"h2o"``
            (accumulated attention of all queries), ``"keynorm"`` (smaller key norm ranks
            higher; needs no queries), ``"streaming"`` (sinks and the most recent tokens). The
            attention scorers need the model's queries (pass ``model=``); without a model the
            cache uses ``"keynorm"``.
        observation_window: queries per forward that ``"snapkv"`` scores with.
        center_keys: key conditioning (see docs/cache.md, "Key conditioning"): ``None`` (default) or ``True``
            conditions keys automatically, per layer and KV head: the mean key is removed with
            RoPE undone (the model's own frequencies), the sink tokens' keys are stored exactly,
            and where the model's queries were seen a per-channel scale is fitted. ``False``
            encodes keys as they are (the override for comparisons). Either way, a layer whose
            keys distort the attention logits far beyond the codec's normal error keeps them
            exact (``stats()["guarded_layers"]``).
        merge: what happens to an evicted token: ``"off"`` drops it; ``"values"`` folds its
            value into the kept token with the most similar key among those being encoded now
            (a weighted mean by attention score; 1 each for keynorm/streaming), ``"keys_values"``
            folds its key too. The merged token's score grows by the folded score.
        merge_bias: with ``merge``, a merged token's logits get ``log n``, n the tokens it stands
            for, so that it draws the attention they drew together (needs ``model=``: the bias
            is added in the cache's own attention). Off by default: measured not to help
            (docs/results.md, "Merging with a logit bias").
        layer_overrides: per-layer ``key_bits`` / ``value_bits``, e.g. ``{0: {"key_bits": 16},
            -1: {"key_bits": 16}}`` keeps the first and last layers' keys exact. Layer indices
            may be negative (from the end); they need the model's layer count (``model=``).
            Eviction settings cannot differ per layer: transformers builds one mask for all.
    """

    key_bits: int = 4
    value_bits: int = 4
    recent_window: int = 128
    block_size: int = 64
    method: str = "e8"
    seed: int = 0
    scale_bits: int = 16
    keep_ratio: float = 1.0
    token_budget: int | None = None
    target_ratio: float | None = None
    full_bits_ratio: float = 1.0
    full_bits_split: str = "head"
    sink_tokens: int = 4
    scorer: str = "snapkv"
    observation_window: int = 64
    center_keys: bool | None = None
    merge: str = "off"
    merge_bias: bool = False
    layer_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        # Integers of any kind (numpy's too) are stored as int; anything else is refused here,
        # not later in torch or at save.
        for name in ("key_bits", "value_bits"):
            value = getattr(self, name)
            if not _is_integer(value) or operator.index(value) not in CACHE_BITS:
                raise ValueError(f"`{name}` must be one of {CACHE_BITS} but got {value!r}")
            object.__setattr__(self, name, operator.index(value))
        self._set_int("recent_window", minimum=0)
        self._set_int("block_size", minimum=1)
        self._set_int("seed", minimum=0, maximum=MAX_SEED)
        if not _is_integer(self.scale_bits) or operator.index(self.scale_bits) not in SCALE_BITS:
            raise ValueError(f"`scale_bits` must be one of {SCALE_BITS} but got {self.scale_bits!r}")
        object.__setattr__(self, "scale_bits", operator.index(self.scale_bits))
        allowed = [m.value for m in Method]
        if self.method not in allowed:
            raise ValueError(f"`method` must be one of {allowed} but got {self.method!r}")
        ratio = self.keep_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ValueError(f"`keep_ratio` must be a number in (0, 1] but got {ratio!r}")
        object.__setattr__(self, "keep_ratio", float(ratio))
        ratio = self.target_ratio
        if ratio is not None:
            try:
                ok = not isinstance(ratio, bool) and isinstance(ratio, numbers.Real) and 1 < float(ratio) < math.inf
            except OverflowError:  # an integer beyond float's range
                ok = False
            if not ok:
                raise ValueError(f"`target_ratio` must be None or a finite number > 1 but got {ratio!r}")
            object.__setattr__(self, "target_ratio", float(ratio))
        ratio = self.full_bits_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise ValueError(f"`full_bits_ratio` must be a number in (0, 1] but got {ratio!r}")
        object.__setattr__(self, "full_bits_ratio", float(ratio))
        if self.demotes and (self.method != "e8" or 4 not in (self.key_bits, self.value_bits)):
            raise ValueError(
                "`full_bits_ratio` < 1 demotes 4-bit E8 codes to 2 bits, but neither side is 4-bit e8 "
                f"(key_bits={self.key_bits}, value_bits={self.value_bits}, method={self.method!r})"
            )
        if self.full_bits_split not in FULL_BITS_SPLITS:
            raise ValueError(
                f"`full_bits_split` must be one of {list(FULL_BITS_SPLITS)} but got {self.full_bits_split!r}"
            )
        self._set_int("sink_tokens", minimum=0)
        self._set_int("observation_window", minimum=1)
        if self.token_budget is not None:
            try:
                self._set_int("token_budget", minimum=self.budget_floor)
            except ValueError as error:
                raise ValueError(
                    f"{error} (sink_tokens + recent_window + block_size: what a layer always holds)"
                ) from None
        if self.scorer not in SCORERS:
            raise ValueError(f"`scorer` must be one of {list(SCORERS)} but got {self.scorer!r}")
        if self.merge not in MERGES:
            raise ValueError(f"`merge` must be one of {list(MERGES)} but got {self.merge!r}")
        if not isinstance(self.merge_bias, bool):
            raise ValueError(f"`merge_bias` must be True or False but got {self.merge_bias!r}")
        if self.merge_bias and self.merge == "off":
            raise ValueError("`merge_bias` raises merged tokens' logits, but `merge` is 'off' (nothing is merged)")
        if self.center_keys is not None and not isinstance(self.center_keys, bool):
            raise ValueError(f"`center_keys` must be None (automatic), True or False but got {self.center_keys!r}")
        object.__setattr__(self, "layer_overrides", _frozen_overrides(self, self.layer_overrides))

    def _set_int(self, name: str, minimum: int, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if not _is_integer(value) or not minimum <= operator.index(value) <= (maximum or math.inf):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise ValueError(f"`{name}` must be an integer {bound} but got {value!r}")
        object.__setattr__(self, name, operator.index(value))

    def __hash__(self) -> int:
        overrides = tuple(sorted((index, tuple(sorted(f.items()))) for index, f in self.layer_overrides.items()))
        return hash(tuple(overrides if f.name == "layer_overrides" else getattr(self, f.name) for f in fields(self)))

    def __deepcopy__(self, memo: dict) -> "NexusQuantConfig":
        return self  # frozen all the way down

    def __reduce__(self):
        return NexusQuantConfig.from_dict, (self.to_dict(),)

    def check_layers(self, layers: int) -> None:
        """Refuse ``layer_overrides`` that name no layer of a ``layers``-layer model, or one layer twice."""
        outside = [index for index in self.layer_overrides if not -layers <= index < layers]
        if outside:
            raise ValueError(
                f"`layer_overrides` names layers {outside}, but the model has {layers} (indices "
                f"{-layers} to {layers - 1})"
            )
        twice = sorted(index for index in self.layer_overrides if index >= 0 and index - layers in self.layer_overrides)
        if twice:
            raise ValueError(f"`layer_overrides` names layers {twice} twice (also as {[i - layers for i in twice]})")

    @property
    def evicts(self) -> bool:
        """Whether any token is ever dropped."""
        return self.keep_ratio < 1 or self.token_budget is not None or self.target_ratio is not None

    @property
    def demotes(self) -> bool:
        """Whether tokens are ever demoted to 2 bits."""
        return self.full_bits_ratio < 1

    @property
    def ranks(self) -> bool:
        """Whether layers rank their tokens (to evict or to demote them)."""
        return self.evicts or self.demotes

    def full_bits_budget(self, seen: int) -> int:
        """Tokens a full-attention layer may hold above 2 bits after ``seen`` tokens (window and sinks included)."""
        return math.ceil(self.full_bits_ratio * seen)

    def budget(self, seen: int) -> int:
        """Tokens a full-attention layer may keep after ``seen`` tokens by ``keep_ratio`` and
        ``token_budget`` (``target_ratio`` needs the model's shapes: allocation.py); never below
        what the sinks, the full-precision window and one block of tokens waiting to leave it occupy."""
        limit = math.ceil(self.keep_ratio * seen)
        if self.token_budget is not None:
            limit = min(limit, self.token_budget)
        return max(limit, self.budget_floor)

    @property
    def budget_floor(self) -> int:
        return self.sink_tokens + self.recent_window + self.block_size

    @property
    def compresses(self) -> bool:
        """Whether any side is quantized at all."""
        return min(self.key_bits, self.value_bits) < 16

    def for_layer(self, index: int, layers: int) -> "NexusQuantConfig":
        """The settings of layer ``index`` of ``layers``, overrides applied."""
        chosen = self.layer_overrides.get(index, self.layer_overrides.get(index - layers, {}))
        if not chosen:
            return self
        if 4 not in (chosen.get("key_bits", self.key_bits), chosen.get("value_bits", self.value_bits)):
            chosen = {**chosen, "full_bits_ratio": 1.0}  # nothing of this layer's can be demoted
        return replace(self, layer_overrides={}, **chosen)

    @classmethod
    def preset(cls, name: str, **overrides) -> "NexusQuantConfig":
        """A measured operating point: ``"lossless"`` (K4V4, near-lossless), ``"compact"``
        (K4V2, every token kept), ``"balanced"`` (K4V4 keeping half the tokens), ``"max"``
        (K4V2 keeping a quarter), or ``"8x"`` / ``"16x"`` (K4V2 keeping as many tokens as fit
        that ratio, ``target_ratio``); fields can be overridden."""
        if name not in PRESETS:
            raise ValueError(f"`preset` must be one of {list(PRESETS)} but got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["layer_overrides"] = {index: dict(chosen) for index, chosen in self.layer_overrides.items()}
        return values

    @classmethod
    def from_dict(cls, values: Mapping) -> "NexusQuantConfig":
        if not isinstance(values, Mapping):
            raise ValueError(f"a NexusQuantConfig is made from a dict of its fields but got {values!r}")
        values = dict(values)
        preset = values.pop("preset", None)  # {"preset": "max", "keep_ratio": 0.5}: fields on top of a preset
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown NexusQuantConfig fields {unknown}; allowed: {sorted(known)} and 'preset'")
        return cls(**values) if preset is None else cls.preset(preset, **values)


def _is_integer(value: object) -> bool:
    """An int or numpy integer; not a bool, not a float however round."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _frozen_overrides(config: NexusQuantConfig, overrides: object) -> Mapping:
    """``layer_overrides`` checked and made read-only: {layer index: {"key_bits"/"value_bits": bits}}.
    Indices may be strings of integers (JSON keys), never floats or bools."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"`layer_overrides` must be a dict of layer index -> fields but got {overrides!r}")
    checked = {}
    for key, chosen in overrides.items():
        if _is_integer(key):
            index = operator.index(key)
        elif isinstance(key, str) and re.fullmatch(r"-?[0-9]+", key):
            index = int(key)
        else:
            raise ValueError(f"`layer_overrides` keys must be layer indices (integers) but got {key!r}")
        if index in checked:
            raise ValueError(f"`layer_overrides` names layer {index} twice")
        unknown = sorted(set(chosen) - {"key_bits", "value_bits"}) if isinstance(chosen, Mapping) else [chosen]
        if unknown:
            raise ValueError(f"`layer_overrides[{index}]` may set only 'key_bits' and 'value_bits' but got {unknown}")
        try:
            # Validates (and normalises) the values; a layer with no 4-bit side demotes nothing (for_layer).
            layer = replace(config, layer_overrides={}, full_bits_ratio=1.0, **chosen)
        except ValueError as error:
            raise ValueError(f"`layer_overrides[{index}]`: {error}") from None
        checked[index] = MappingProxyType({name: getattr(layer, name) for name in chosen})
    return MappingProxyType(checked)
