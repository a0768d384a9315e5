"""NexusQuantConfig: what the cache compresses and how, validated once, frozen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .codec import SUPPORTED_BITS, Method

__all__ = ["NexusQuantConfig"]

CACHE_BITS = (*SUPPORTED_BITS, 16)  # 16: keep that side at full precision


@dataclass(frozen=True)
class NexusQuantConfig:
    """Settings of a :class:`~nexusquant_cache.NexusQuantCache`.

    Attributes:
        key_bits: bits per key number once a token leaves the recent window: 2, 3, 4, or 16 to
            keep keys at full precision.
        value_bits: the same for values.
        recent_window: the newest tokens of every layer kept at full precision (>= 0).
        block_size: tokens are encoded in blocks: when the full-precision part reaches
            ``recent_window + block_size`` tokens, everything older than the window is encoded
            (once; a token is never re-quantized). Larger blocks encode less often.
        method: ``"e8"`` (lattice codebooks) or ``"scalar"`` (Lloyd-Max baseline).
        seed: seed of the randomized Hadamard rotation.
    """

    key_bits: int = 4
    value_bits: int = 4
    recent_window: int = 128
    block_size: int = 64
    method: str = "e8"
    seed: int = 0

    def __post_init__(self):
        for name in ("key_bits", "value_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or value not in CACHE_BITS:
                raise ValueError(f"`{name}` must be one of {CACHE_BITS} but got {value!r}")
        _check_int("recent_window", self.recent_window, minimum=0)
        _check_int("block_size", self.block_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        allowed = [m.value for m in Method]
        if self.method not in allowed:
            raise ValueError(f"`method` must be one of {allowed} but got {self.method!r}")

    @property
    def compresses(self) -> bool:
        """Whether any side is quantized at all."""
        return min(self.key_bits, self.value_bits) < 16

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NexusQuantConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown NexusQuantConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**values)


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum} but got {value!r}")
