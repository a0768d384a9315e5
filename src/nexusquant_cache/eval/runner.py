"""``run_eval``: every metric for a list of methods on one model, written as JSON, markdown and
plots; and the ``nexusquant-cache eval`` subcommand (:func:`add_arguments`, :func:`main`)."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data import BUILTIN_TEXTS, DEFAULT_TEXT, document_start_id, read_texts, spread_windows
from .efficiency import peak_memory, speed
from .methods import DEFAULT_METHODS, Method, dynamic, parse_method
from .quality import copy_recall, passkey, perplexity_kl
from .report import load_results, markdown, plot, save_results

__all__ = ["METRICS", "EvalResults", "add_arguments", "main", "run_eval"]

METRICS = ("perplexity", "copy_recall", "passkey", "speed", "memory")


@dataclass
class EvalResults:
    """Records (see report.py), what produced them (``meta``) and the files written."""

    records: list[dict]
    meta: dict
    files: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        table = markdown(self.records)
        if self.meta.get("complete") is False:
            finished = ", ".join(dict.fromkeys(record["metric"] for record in self.records)) or "nothing"
            return f"**Incomplete run**: only {finished} finished.\n\n{table}"
        return table

    def save(self, folder: str | Path, plots: bool = True) -> list[Path]:
        """Write ``results.json``, ``results.md`` and (with matplotlib) the plots to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        files = [save_results(folder / "results.json", self.records, self.meta)]
        (folder / "results.md").write_text(self.markdown())
        files.append(folder / "results.md")
        if plots:
            files += plot(self.records, folder)
        self.files = files
        return files

    @classmethod
    def load(cls, folder: str | Path) -> "EvalResults":
        meta, records = load_results(Path(folder) / "results.json")
        return cls(records, meta)


def run_eval(
    model,
    tokenizer,
    methods: Sequence[Method | str] = DEFAULT_METHODS,
    *,
    text: str | Path | None = None,
    metrics: Sequence[str] = METRICS,
    windows: int = 8,
    context: int = 2048,
    score: int = 256,
    chunk: int = 64,
    prefill_chunk: int | None = None,
    copy_depths: Sequence[float] = (0.1, 0.5, 0.9),
    copy_spans: Sequence[int] = (16, 64),
    copy_cue: int = 4,
    copy_trials: int = 1,
    passkey_depths: Sequence[float] = (0.1, 0.5, 0.9),
    passkey_trials: int = 4,
    decode_tokens: int = 32,
    model_name: str | None = None,
    model_source: str | None = None,
    dtype: str = "float32",
    threads: int | None = None,
    seed: int = 0,
    output_dir: str | Path | None = None,
    plots: bool = True,
    progress: bool = True,
) -> EvalResults:
    """Compare ``methods`` on ``model`` with every metric in ``metrics``.

    Args:
        methods: :class:`Method` objects or spec strings (``"dynamic"``, ``"nq:preset=max"``,
            ``"quanto:2"``; see :func:`parse_method`). DynamicCache is added first when absent:
            every ratio is against it.
        text: a UTF-8 text file, a folder of them, or a built-in text (``"python-docs"``,
            ``"python-code"``; see :func:`~nexusquant_cache.eval.data.builtin_texts`; None: python-docs).
        metrics: any of ``"perplexity"`` (perplexity, KL and bytes held over ``windows``
            windows of ``context`` tokens, the last ``score`` scored), ``"copy_recall"``,
            ``"passkey"``, ``"speed"`` (on the first window, then ``decode_tokens`` decoded)
            and ``"memory"`` (peak process memory; needs ``model_source``, the name or folder
            the measuring processes load the model from).
        model_name: how records name the model (default: ``model_source`` or the model type).
        output_dir: where to write results.json, results.md and the plots (None: nowhere). The
            JSON and markdown are rewritten after each metric, so an interrupted run keeps what
            finished; ``meta["complete"]`` is True once every metric ran (the plots come last).
        progress: progress lines on stderr.

    Returns the records, also written to ``output_dir`` when given.
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; allowed: {list(METRICS)}")
    methods = [parse_method(m) for m in methods]
    if not any(m.kind == "dynamic" for m in methods):
        methods.insert(0, dynamic())
    if threads:
        torch.set_num_threads(threads)
    texts = read_texts(text)
    start = document_start_id(tokenizer)
    report = _Progress(progress)
    records: list[dict] = []
    meta = dict(
        model=model_name or model_source or getattr(model.config, "model_type", type(model).__name__),
        methods=[m.to_dict() for m in methods],
        metrics=list(metrics),
        text=[text_name for text_name, _ in texts],
        windows=windows,
        context=context,
        score=score,
        chunk=chunk,
        prefill_chunk=prefill_chunk,
        seed=seed,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
    )
    results = EvalResults(records, meta)

    def finished(new: list[dict], complete: bool = False) -> None:
        """Add a metric's records; with ``output_dir``, write what is measured so far, so an
        interrupted run keeps its finished metrics (``meta["complete"]`` says whether all ran)."""
        for record in new:
            record["model"] = meta["model"]
        records.extend(new)
        meta.update(seconds=round(report.elapsed(), 1), complete=complete)
        if output_dir is not None:
            results.save(output_dir, plots=plots and complete)

    if "perplexity" in metrics or "speed" in metrics or "memory" in metrics:
        window_ids = spread_windows(tokenizer, texts, windows, context, start)
    if "perplexity" in metrics:
        finished(perplexity_kl(model, window_ids, methods, score, chunk, prefill_chunk, report))
    if "copy_recall" in metrics:
        finished(copy_recall(
            model, tokenizer, methods, texts, context, copy_depths, copy_spans, copy_cue, copy_trials, seed,
            chunk, prefill_chunk, start, report,
        ))  # fmt: skip
    if "passkey" in metrics:
        finished(passkey(
            model, tokenizer, methods, texts, context, passkey_depths, passkey_trials, seed, chunk, prefill_chunk,
            start, report,
        ))  # fmt: skip
    if "speed" in metrics:
        finished(speed(model, torch.tensor(window_ids[:1]), methods, decode_tokens, prefill_chunk, report))
    if "memory" in metrics:
        if model_source is None:
            reason = "needs `model_source` (a model name or folder) to load the model in a fresh process"
            finished([
                {"metric": "peak_memory", "method": m.name, "setting": {}, "value": None, "unavailable": reason}
                for m in methods
            ])  # fmt: skip
        else:
            finished(peak_memory(
                model_source, torch.tensor(window_ids[:1]), methods, decode_tokens, dtype,
                torch.get_num_threads(), prefill_chunk or 512, report,
            ))  # fmt: skip
    report.done()
    finished([], complete=True)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``eval`` options to ``parser`` (a subcommand's parser); :func:`main` runs them."""
    parser.add_argument(
        "--model", default="smollm2", help="smollm2, gemma3, qwen2.5-coder-0.5b, a model folder or name"
    )
    parser.add_argument(
        "--text",
        default=DEFAULT_TEXT,
        help=f"a UTF-8 text file, a folder of *.txt, or a text every Python has: {' or '.join(BUILTIN_TEXTS)} "
        "(prose or code; default %(default)s)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="SPEC",
        help="dynamic | nq[:field=value,...] | nq:preset=max | quanto:4 | hqq:2 | fp8, optionally @NAME "
        "(default: %(default)s)",
    )
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--windows", type=int, default=8, help="perplexity windows (default 8)")
    parser.add_argument("--context", type=int, default=2048, help="tokens per prompt (default 2048)")
    parser.add_argument("--score", type=int, default=256, help="tokens scored per window (default 256)")
    parser.add_argument("--chunk", type=int, default=64, help="teacher-forced tokens per forward (default 64)")
    parser.add_argument("--prefill-chunk", type=int, default=None, help="prefill tokens per forward (default all)")
    parser.add_argument("--copy-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--copy-spans", type=int, nargs="+", default=[16, 64], help="span lengths in tokens")
    parser.add_argument("--copy-cue", type=int, default=4, help="span tokens repeated as the cue (default 4)")
    parser.add_argument("--copy-trials", type=int, default=1)
    parser.add_argument("--passkey-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--passkey-trials", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy steps timed (default 32)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output-dir", default="eval-results", help="where results go (default eval-results)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``nexusquant-cache eval`` with the options of :func:`add_arguments`; prints the
    markdown report and returns 0. Bad input raises ValueError saying what is wrong."""
    for name in ("windows", "context", "score", "chunk", "copy_trials", "passkey_trials", "decode_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1 but got {getattr(args, name)}")
    methods = [parse_method(spec) for spec in args.methods]  # bad specs fail before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..models import load_model  # late: only when a model is loaded here

    model, tokenizer = load_model(args.model, args.dtype)
    results = run_eval(
        model,
        tokenizer,
        methods,
        text=args.text,
        metrics=args.metrics,
        windows=args.windows,
        context=args.context,
        score=args.score,
        chunk=args.chunk,
        prefill_chunk=args.prefill_chunk,
        copy_depths=args.copy_depths,
        copy_spans=args.copy_spans,
        copy_cue=args.copy_cue,
        copy_trials=args.copy_trials,
        passkey_depths=args.passkey_depths,
        passkey_trials=args.passkey_trials,
        decode_tokens=args.decode_tokens,
        model_name=Path(args.model).name if Path(args.model).is_dir() else args.model,
        model_source=args.model,
        dtype=args.dtype,
        seed=args.seed,
        output_dir=args.output_dir,
        plots=not args.no_plots,
        progress=not args.quiet,
    )
    print(results.markdown())
    print(f"\nwrote {', '.join(map(str, results.files))}", file=sys.stderr)
    return 0


class _Progress:
    """Progress lines on stderr: what runs now and the time so far (one line per step, or an
    overwritten line on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled, self.started = enabled, time.perf_counter()
        self.ending = "\r" if sys.stderr.isatty() else "\n"
        self.width = 0

    def __call__(self, message: str) -> None:
        if self.enabled:
            line = f"[eval {self.elapsed():7.1f} s] {message}"
            print(line.ljust(self.width), end=self.ending, file=sys.stderr, flush=True)
            self.width = len(line)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def done(self) -> None:
        if self.enabled and self.ending == "\r":
            print(file=sys.stderr)
