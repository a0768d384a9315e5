"""nexusquant-cache: compressed KV caches for HuggingFace transformers.

The public names are imported on first use, so importing the package, and the command line,
start without loading torch or transformers. Importing the package registers
``cache_implementation="nexusquant"`` with transformers (integration.py): at once if
transformers is imported already, otherwise as soon as it is.
"""

import importlib

from ._lazy import after_import, lazy_attributes

_HOMES = {
    "CacheFileError": "io",
    "Encoded": "codec",
    "Method": "codec",
    "NexusQuantCache": "cache",
    "NexusQuantConfig": "config",
    "PromptMismatchError": "io",
    "decode": "codec",
    "encode": "codec",
    "nexusquant_evict": "integration",
    "prefill": "cache",
    "prompt_hash": "io",
}
__all__ = sorted(_HOMES)
__version__ = "0.1.0"
__getattr__, __dir__ = lazy_attributes(__name__, _HOMES)

after_import("transformers", lambda: importlib.import_module(".integration", __name__))
