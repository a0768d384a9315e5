"""nexusquant-cache: compressed KV caches for HuggingFace transformers.

The public names are imported on first use, so importing the package, and the command line,
start without loading torch or transformers. Importing the package registers
``cache_implementation="nexusquant"`` with transformers (integration.py): at once if
transformers' generation modules are imported already, otherwise as soon as they are.
"""

from . import integration
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

after_import("transformers.generation.configuration_utils", integration.accept_cache_implementation)
after_import("transformers.generation.utils", integration.build_cache_for_its_name)
