"""nexusquant-cache: compressed KV caches for HuggingFace transformers."""

from .codec import Encoded, Method, decode, encode

__all__ = ["Encoded", "Method", "decode", "encode"]
__version__ = "0.1.0"
