"""Text for the evaluation: windows spread through a set of books, filler for the retrieval
prompts, and the prompts themselves (copy recall, pass key).

Texts need no download: every Python installation has English prose (``"python-docs"``: the
language reference and library topics that ``help()`` shows, from ``pydoc_data``) and code
(``"python-code"``: the standard library's largest modules). Any UTF-8 text file, or a folder of
``*.txt`` files, works too. Tokenizers need only ``tokenizer(text,
add_special_tokens=False)["input_ids"]``, ``convert_ids_to_tokens`` and the usual special-token
attributes, so a tokenizer of one's own works as well as a transformers one.
"""

from __future__ import annotations

import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "BUILTIN_TEXTS",
    "COMMON_WORDS",
    "DEFAULT_TEXT",
    "Prompt",
    "builtin_texts",
    "copy_prompt",
    "document_start_id",
    "encode",
    "passkey_prompt",
    "random_span",
    "read_texts",
    "sentence_end",
    "spread_windows",
]

BUILTIN_TEXTS = ("python-docs", "python-code")
DEFAULT_TEXT = "python-docs"
# Standard-library modules at least this long (characters) make up "python-code": about 20 of
# them, each long enough for an 8k-token window.
_CODE_MODULE_CHARS = 60_000
# Plain, frequent English words: a planted span of them is neither rare nor predictable.
COMMON_WORDS = tuple(
    """time year people way day man thing woman life child world school state family student group
    country problem hand part place case week company system program question work government
    number night point home water room mother area money story fact month lot right study book eye
    job word business issue side kind head house service friend father power hour game line end
    member law car city community name president team minute idea kid body information back parent
    face others level office door health person art war history party result change morning reason
    research girl guy moment air teacher force education foot boy age policy music market sense
    nation plan college interest death experience effect use class control care field development
    role effort rate heart drug show leader light voice wife police mind price report decision son
    view relationship town road arm difference value building action model season society tax
    director position player record paper space ground form event official matter center couple
    site project activity star table need court oil situation cost industry figure street image
    phone data picture practice piece land product doctor wall patient worker news test movie north
    love support technology step baby computer type attention film tree source organization hair
    window evidence population truth""".split()
)


def builtin_texts(name: str) -> list[tuple[str, str]]:
    """``[(name, text)]`` of a text every Python installation has (see :data:`BUILTIN_TEXTS`):

    - ``"python-docs"``: English prose, the ~80 topics of the language reference and library
      documentation that ``help()`` shows (``pydoc_data.topics``), joined in name order into one
      document of about 110k SmolLM2 tokens;
    - ``"python-code"``: Python source, every standard-library module of at least 60,000
      characters (``argparse.py``, ``typing.py``, ...), one document each.

    The texts are those of the running Python, so they differ slightly between Python versions."""
    if name == "python-docs":
        from pydoc_data.topics import topics

        return [("python-docs", "\n\n".join(topics[key].strip() for key in sorted(topics)))]
    if name == "python-code":
        folder = Path(sysconfig.get_paths()["stdlib"])
        modules = [(path.name, path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.py"))]
        return [(file, text) for file, text in modules if len(text) >= _CODE_MODULE_CHARS]
    raise ValueError(f"unknown built-in text {name!r}; allowed: {list(BUILTIN_TEXTS)}")


def read_texts(source: str | Path | None = None) -> list[tuple[str, str]]:
    """``[(name, text)]`` of a built-in text (:func:`builtin_texts`; a name given as a string,
    ``None``: ``"python-docs"``), a UTF-8 text file, or every ``*.txt`` in a folder (sorted). A
    ``Path`` is always a path (``"./python-docs"`` too)."""
    if source is None or (isinstance(source, str) and source in BUILTIN_TEXTS):
        return builtin_texts(source or DEFAULT_TEXT)
    path = Path(source)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"text folder {path} holds no *.txt files; pass a text file or a folder of them")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(
            f"text source {str(path)!r} is neither a file nor a folder nor one of the built-in texts "
            f"{list(BUILTIN_TEXTS)}"
        )
    return [(file.name, file.read_text(encoding="utf-8")) for file in files]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def document_start_id(tokenizer) -> int | None:
    """The token that starts a document in pretraining: ``<|endoftext|>`` where the vocabulary
    has it (GPT-2, SmolLM2, Qwen: their BOS, if any, is a chat token), else the BOS token."""
    convert = getattr(tokenizer, "convert_tokens_to_ids", None)
    unknown = getattr(tokenizer, "unk_token_id", None)
    if convert is not None:
        found = convert("<|endoftext|>")
        if isinstance(found, int) and found != unknown:
            return found
    return getattr(tokenizer, "bos_token_id", None)


def spread_windows(
    tokenizer, texts: list[tuple[str, str]], count: int, length: int, start_id: int | None = None, phase: float = 0.5
) -> list[list[int]]:
    """``count`` windows of ``length`` token ids spread evenly through ``texts``: window k comes
    from text ``k % len(texts)``, at the fraction ``(j + phase) / n`` of it (its j-th of n
    windows), starting at the next paragraph. Each begins with ``start_id`` when given."""
    if count < 1 or length < 2:
        raise ValueError(f"need count >= 1 and length >= 2 but got count={count}, length={length}")
    if not 0 <= phase < 1:
        raise ValueError(f"`phase` must be in [0, 1) but got {phase}")
    prefix = [] if start_id is None else [start_id]
    windows = []
    for k in range(count):
        name, text = texts[k % len(texts)]
        n = len(range(k % len(texts), count, len(texts)))
        span = 8 * length  # characters: comfortably more than `length` tokens of English prose
        start = int((k // len(texts) + phase) / n * max(0, len(text) - span))
        paragraph = text.find("\n\n", start, start + span // 2)
        start = paragraph + 2 if paragraph >= 0 else start
        ids = encode(tokenizer, text[start : start + span].lstrip())
        if len(ids) < length - len(prefix):
            ids = encode(tokenizer, text[-span:])  # near the end of a short text
        if len(ids) < length - len(prefix):
            raise ValueError(f"{name} is too short for a {length}-token window ({len(ids)} tokens)")
        windows.append(prefix + ids[: length - len(prefix)])
    return windows


def random_span(tokenizer, length: int, seed: int) -> list[int]:
    """``length`` token ids of seeded random words from :data:`COMMON_WORDS` (space-separated)."""
    rng = random.Random(seed)
    words = [rng.choice(COMMON_WORDS) for _ in range(length)]  # a word is at least one token
    return encode(tokenizer, " " + " ".join(words))[:length]


@dataclass
class Prompt:
    """A retrieval prompt: ``prefix`` is prefilled (``context`` tokens), then ``tail`` enters the
    cache teacher-forced; ``targets`` indexes the tail tokens whose greedy prediction is scored."""

    prefix: torch.Tensor  # [1, context]
    tail: torch.Tensor  # [tail]
    targets: slice
    depth: float  # where the planted tokens start, as a fraction of the prefix


def copy_prompt(filler: list[int], span: list[int], depth: float, context: int, cue: int, tokenizer=None) -> Prompt:
    """Plant ``span`` in ``filler`` at ``depth`` (a fraction of ``context``; snapped back to a
    sentence end when ``tokenizer`` is given), fill to ``context`` tokens, then repeat the span:
    its first ``cue`` tokens prompt the rest, which are scored.

    ``filler[0]`` (e.g. a document-start token) always stays first."""
    if not 0 < cue < len(span):
        raise ValueError(f"`cue` must be in [1, {len(span) - 1}] for a {len(span)}-token span but got {cue}")
    prefix, cut = _plant(filler, span, depth, context, tokenizer)
    return Prompt(torch.tensor([prefix]), torch.tensor(span), slice(cue, len(span)), cut / context)


def passkey_prompt(tokenizer, filler: list[int], key: str, depth: float, context: int) -> Prompt:
    """``The pass key is KEY. Remember it.`` planted at ``depth`` in ``filler``, then ``What is
    the pass key? The pass key is`` ending the ``context``-token prefix; the tail is the key's
    tokens (the same ids as in the needle), all of which must be predicted."""
    key_ids = encode(tokenizer, " " + key)
    needle = encode(tokenizer, " The pass key is") + key_ids + encode(tokenizer, ". Remember it.")
    question = encode(tokenizer, " What is the pass key? The pass key is")
    planted, cut = _plant(filler, needle, depth, context - len(question), tokenizer)
    return Prompt(torch.tensor([planted + question]), torch.tensor(key_ids), slice(0, len(key_ids)), cut / context)


def _plant(filler: list[int], planted: list[int], depth: float, context: int, tokenizer) -> tuple[list[int], int]:
    """``filler`` with ``planted`` inserted near ``depth``, ``context`` tokens in all, and where it starts."""
    if not 0 <= depth <= 1:
        raise ValueError(f"`depth` must be in [0, 1] but got {depth}")
    room = context - len(planted)
    if room < 1 or len(filler) < room:
        raise ValueError(
            f"a {context}-token prompt needs more than the {len(planted)} planted tokens and at least "
            f"{max(room, 1)} filler tokens, but got {len(filler)}"
        )
    cut = min(max(1, round(depth * room)), room)
    if tokenizer is not None:
        cut = sentence_end(tokenizer, filler, cut)
    return filler[:cut] + planted + filler[cut:room], cut


def sentence_end(tokenizer, ids: list[int], cut: int, reach: int = 64) -> int:
    """The position just after the last sentence end (a token with '.' or a newline) at or
    before ``cut``, within ``reach`` tokens; ``cut`` itself if there is none."""
    tokens = tokenizer.convert_ids_to_tokens(ids[max(1, cut - reach) : cut])
    for offset, token in enumerate(reversed(tokens)):
        if "." in token or "\n" in token or "Ċ" in token:  # Ċ: a newline in byte-level BPE
            return cut - offset
    return cut
