"""The ``nexusquant-cache`` command: one subcommand per task.

    nexusquant-cache compress book.txt -o book.nqc --preset max      # prefill once, save the cache
    nexusquant-cache inspect book.nqc                                # model, tokens, bytes, ratio

    nexusquant-cache eval --methods dynamic nq:preset=max quanto:2      # compare compressors
    nexusquant-cache demo                                            # the first five minutes

Each subcommand is a ``_name(args)`` function registered in :func:`build_parser` (``eval``'s
lives in the ``eval`` package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from .cache import NexusQuantCache, prefill
from .config import PRESETS, NexusQuantConfig
from .io import FORMAT_VERSION
from .models import load_model

__all__ = ["build_parser", "main"]

DEMO_TEXT = "prideprejudice.txt"  # in the Austen folder (eval.data.DEFAULT_TEXT_DIR)


def config_from(args: argparse.Namespace) -> NexusQuantConfig:
    """The preset (if any) with every field option given on top."""
    chosen = {f.name: getattr(args, f.name) for f in fields(NexusQuantConfig) if getattr(args, f.name) is not None}
    return NexusQuantConfig.preset(args.preset, **chosen) if args.preset else NexusQuantConfig(**chosen)


def _compress(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from(args)
    text = Path(args.text).read_text(encoding="utf-8")
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    ids = tokenizer(text, return_tensors="pt").input_ids
    bos = tokenizer.bos_token_id
    if bos is not None and ids[0, 0] != bos:  # a document starts a text, as in training
        ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
    if args.max_tokens:
        ids = ids[:, : args.max_tokens]
    cache = NexusQuantCache(config, model=model)
    started = time.perf_counter()
    ending = "\r" if sys.stderr.isatty() else "\n"

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - started
        rate = done / elapsed
        print(
            f"prefill {done}/{total} tokens ({100 * done / total:.0f}%), {elapsed:.1f} s, {rate:.0f} tokens/s",
            end=ending,
            file=sys.stderr,
            flush=True,
        )

    prefill(model, ids.to(model.device), cache, args.chunk_size, progress)
    cache.save(args.output, prompt_ids=ids)
    stats = cache.stats()
    print(
        f"\n{args.output}: {ids.shape[1]} tokens, {Path(args.output).stat().st_size:,} bytes "
        f"({stats['ratio']:.2f}x smaller than a 16-bit cache) in {time.perf_counter() - started:.1f} s",
        file=sys.stderr,
    )
    return 0


def _inspect(args: argparse.Namespace) -> int:
    cache = NexusQuantCache.load(args.file)
    stats = cache.stats()
    report = {
        "file": str(args.file),
        "file_bytes": Path(args.file).stat().st_size,
        "format_version": FORMAT_VERSION,
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
    print(f"file            {report['file']} ({report['file_bytes']:,} bytes, format version {FORMAT_VERSION})")
    print("model           " + ", ".join(f"{key} {value}" for key, value in model.items() if value is not None))
    print(
        f"layers          {len(cache.layers)} ({len(cache.layers) - sliding} full attention, {sliding} sliding window)"
    )
    print(f"tokens          {stats['tokens_seen']} seen, {stats['tokens_stored']} stored per full-attention layer")
    prompt = cache.prompt
    print("prompt sha256   " + (f"{prompt['sha256']} ({prompt['length']} tokens)" if prompt else "not recorded"))
    print("config          " + ", ".join(f"{key}={value}" for key, value in report["config"].items()))
    parts = stats["bytes"]
    print("bytes           " + ", ".join(f"{part} {size:,}" for part, size in parts.items()))
    print(f"16-bit cache    {stats['baseline_bytes']:,} bytes: ratio {stats['ratio']:.2f}x")
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The first five minutes: one long Austen prompt, continued with and without compression."""
    from transformers import DynamicCache

    from .eval.data import DEFAULT_TEXT_DIR

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, torch.float32)
    text = Path(args.text or DEFAULT_TEXT_DIR / DEMO_TEXT).read_text(encoding="utf-8")
    ids = tokenizer(text[text.find("It is a truth") :] if "It is a truth" in text else text, return_tensors="pt")
    ids = ids.input_ids[:, : args.tokens]
    print(f"{args.model}: a {ids.shape[1]}-token prompt from {Path(args.text or 'Pride and Prejudice').name}, "
          f"{args.new_tokens} new tokens, greedy", file=sys.stderr)  # fmt: skip
    config = NexusQuantConfig.preset(args.preset)
    rows = []
    for name, cache in [("DynamicCache", DynamicCache(config=model.config)),
                        (f"NexusQuantCache {args.preset}", NexusQuantCache(config, model=model))]:  # fmt: skip
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        prefill(model, ids[:, :-1], cache, chunk_size=512)
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, cache=cache, max_new_tokens=args.new_tokens, do_sample=False, min_new_tokens=1)
        decode_s = time.perf_counter() - started
        if isinstance(cache, NexusQuantCache):
            stats = cache.stats()
            held, baseline = stats["bytes"]["total"], stats["baseline_bytes"]
        else:
            held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
            baseline = held * 2 // model.dtype.itemsize  # the 16-bit cache of the same tokens
        rows.append((name, out[0, ids.shape[1] :], held, baseline, prefill_s, out.shape[1] - ids.shape[1], decode_s))
    reference = rows[0][1]
    mib = 1 << 20
    print("| cache | KV memory held | ratio vs a 16-bit cache | prefill | decode | tokens equal to uncompressed |")
    print("|---|---|---|---|---|---|")
    for name, tokens, held, baseline, prefill_s, count, decode_s in rows:
        same = (tokens[: len(reference)] == reference[: len(tokens)]).float().mean().item()
        print(f"| {name} | {held / mib:.2f} MiB | {baseline / held:.2f}x | {prefill_s:.1f} s | "
              f"{count / decode_s:.1f} tokens/s | {100 * same:.0f}% |")  # fmt: skip
    for name, tokens, *_ in rows:
        print(f"\n{name}:\n...{tokenizer.decode(tokens, skip_special_tokens=True)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nexusquant-cache", description="Compressed KV caches for transformers.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", help="describe a saved cache file")
    inspect.add_argument("file", help="a file written by NexusQuantCache.save or `compress`")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead")
    inspect.set_defaults(run=_inspect)

    compress = commands.add_parser("compress", help="prefill a text file with a model and save the cache")
    compress.add_argument("text", help="a UTF-8 text file: the prompt")
    compress.add_argument("-o", "--output", required=True, help="where to write the cache (e.g. book.nqc)")
    compress.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a local model folder")
    compress.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    compress.add_argument("--max-tokens", type=int, help="keep only the first N tokens of the text")
    compress.add_argument("--chunk-size", type=int, default=512, help="prefill tokens per forward (default 512)")
    compress.add_argument("--threads", type=int, help="torch CPU threads")
    options = compress.add_argument_group("cache configuration (a preset and/or fields; see docs/cache.md)")
    options.add_argument("--preset", choices=list(PRESETS), help="start from a measured operating point")
    for field in fields(NexusQuantConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else field.default_factory()
        if isinstance(default, bool):
            options.add_argument(flag, type=_boolean, metavar="true|false", help=f"(default {default})")
        elif isinstance(default, dict):
            options.add_argument(flag, type=json.loads, metavar="JSON", help='e.g. \'{"0": {"key_bits": 16}}\'')
        else:
            kind = int if default is None else type(default)  # token_budget: an int or none
            options.add_argument(flag, type=kind, help=f"(default {default})")
    compress.set_defaults(run=_compress)

    demo = commands.add_parser("demo", help="compress a long Austen prompt and continue it, with and without")
    demo.add_argument("--model", default="smollm2", help="smollm2, gemma3, or a local model folder")
    demo.add_argument("--text", help="a UTF-8 text file (default: Pride and Prejudice)")
    demo.add_argument("--tokens", type=int, default=4096, help="prompt tokens (default 4096)")
    demo.add_argument("--new-tokens", type=int, default=48, help="tokens to generate (default 48)")
    demo.add_argument("--preset", choices=list(PRESETS), default="balanced")
    demo.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    demo.set_defaults(run=_demo)

    from . import eval as evaluation  # late: the harness is not needed by the other commands

    evaluation.add_arguments(
        commands.add_parser("eval", help="quality, bytes, memory and speed of KV compressors side by side")
    ).set_defaults(run=evaluation.main)
    return parser


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return text.lower() == "true"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:  # CacheFileError is a ValueError
        print(f"nexusquant-cache {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
