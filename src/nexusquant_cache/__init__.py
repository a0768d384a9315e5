"""nexusquant-cache: compressed KV caches for HuggingFace transformers."""

from .cache import NexusQuantCache
from .codec import Encoded, Method, decode, encode
from .config import NexusQuantConfig
from .integration import nexusquant_evict

__all__ = ["Encoded", "Method", "NexusQuantCache", "NexusQuantConfig", "decode", "encode", "nexusquant_evict"]
__version__ = "0.1.0"
