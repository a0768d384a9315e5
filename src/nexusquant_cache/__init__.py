"""nexusquant-cache: compressed KV caches for HuggingFace transformers."""

from .cache import NexusQuantCache, prefill
from .codec import Encoded, Method, decode, encode
from .config import NexusQuantConfig
from .integration import nexusquant_evict
from .io import CacheFileError, PromptMismatchError, prompt_hash

__all__ = [
    "CacheFileError",
    "Encoded",
    "Method",
    "NexusQuantCache",
    "NexusQuantConfig",
    "PromptMismatchError",
    "decode",
    "encode",
    "nexusquant_evict",
    "prefill",
    "prompt_hash",
]
__version__ = "0.1.0"
