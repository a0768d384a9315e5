"""Jane Austen's novels for the benchmarks (development data in shared/data/austen beside the
repository; docs/results.md was measured on them). Any text works with ``--text``."""

from __future__ import annotations

import random
from pathlib import Path

TEXT_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen"
EMMA = TEXT_DIR / "emma.txt"
TEXT_HELP = "a text file or a built-in text (python-docs, python-code); default: Emma from the Austen folder"


def read_book(source: str | None) -> str:
    """The text a benchmark reads: ``source`` (a text file, a folder of them or a built-in text
    name, see ``nexusquant_cache.eval.read_texts``), by default Emma from the Austen folder."""
    if source is not None:
        from nexusquant_cache.eval import read_texts

        return "\n\n".join(text for _, text in read_texts(source))
    if not EMMA.is_file():
        raise FileNotFoundError(f"{EMMA} is missing: put the Austen novels there, or pass --text FILE or python-docs")
    return EMMA.read_text(encoding="utf-8")


def austen_windows(tokenizer, text_dir: Path, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` windows of ``length`` tokens, cycling through the novels at seeded random offsets.

    Each window starts at a paragraph and, if the tokenizer has a BOS token, begins with it.
    """
    books = sorted(text_dir.glob("*.txt"))
    if not books:
        raise FileNotFoundError(f"no .txt files in {text_dir}; pass --text-dir")
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rng = random.Random(seed)
    windows = []
    for i in range(count):
        text = books[i % len(books)].read_text(encoding="utf-8")
        span = 8 * length  # characters: comfortably more than `length` tokens of English prose
        start = rng.randrange(max(1, len(text) - 2 * span))
        paragraph = text.find("\n\n", start, start + span)
        start = paragraph + 2 if paragraph >= 0 else start
        ids = tokenizer(text[start : start + span].lstrip(), add_special_tokens=False).input_ids
        window = prefix + ids[: length - len(prefix)]
        if len(window) < length:
            raise ValueError(f"{books[i % len(books)].name} is too short for a {length}-token window")
        windows.append(window)
    return windows
