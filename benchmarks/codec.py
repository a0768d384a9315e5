"""Codec benchmark: distortion on Gaussian data and on real KV caches, and CPU throughput.

Three parts, each printing one JSON line per configuration and then markdown tables:

1. Gaussian: i.i.d. N(0, 1) vectors (d = 64, 128); relative MSE of e8 and scalar at 2, 3, 4 bits
   beside the Shannon bound 2^(-2R), at R = code bits and at R = total bits (codes + scale).
2. SmolLM2-135M: every layer's cached keys (post-RoPE) and values on Jane Austen windows, as
   head_dim = 64 vectors; relative MSE, e8 / scalar ratio at equal bytes, and the worst layer.
3. Throughput at d = 128: encode, decode and decode_units (the rotated-domain lookup attention
   reads) vectors/s, with rotate() and clone() as floors.

Run from the repository root:

    PYTHONPATH=src python benchmarks/codec.py               # full run: about a minute on 2 cores
    PYTHONPATH=src python benchmarks/codec.py --write-docs  # also docs/codec-results.md and docs/codec.png
    PYTHONPATH=src python benchmarks/codec.py --quick       # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from _austen import TEXT_DIR, austen_windows
from torch import Tensor

from nexusquant_cache.codec import decode, decode_units, encode, rotate

METHODS = ("e8", "scalar")
BITS = (2, 3, 4)
KINDS = ("keys", "values")
REPO = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit(records: list[dict]) -> None:
    for record in records:
        print(json.dumps(record), flush=True)


def distortion(x: Tensor, method: str, bits: int, seed: int) -> tuple[Tensor, Tensor, float]:
    """Per-vector squared error and energy of an encode/decode round trip, and total bits per number."""
    encoded = encode(x, bits, method, seed)
    error = (x - decode(encoded)).double().pow(2).sum(-1)
    return error, x.double().pow(2).sum(-1), 8 * encoded.nbytes / x.numel()


# --- 1. Gaussian -----------------------------------------------------------------------------


def gaussian_part(n: int, dims: tuple[int, ...], seed: int) -> list[dict]:
    records = []
    for dim in dims:
        x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
        for method in METHODS:
            for bits in BITS:
                error, energy, total_bits = distortion(x, method, bits, seed)
                mse = (error.sum() / energy.sum()).item()
                records.append(
                    dict(
                        part="gaussian",
                        dim=dim,
                        vectors=n,
                        method=method,
                        bits=bits,
                        total_bits=total_bits,
                        rel_mse=mse,
                        bound_total_bits=2 ** (-2 * total_bits),
                        bound_code_bits=2 ** (-2 * bits),
                    )
                )
    return records


# --- 2. SmolLM2 keys and values --------------------------------------------------------------


@torch.inference_mode()
def capture_kv(model, windows: list[list[int]]) -> dict[str, list[Tensor]]:
    """Per kind, per layer: every cached vector of every window, [windows * kv_heads * tokens, head_dim]."""
    per_window = []
    for window in windows:
        cache = model(torch.tensor([window]), use_cache=True).cache
        layers = cache.layers  # each holds .keys (after RoPE) and .values: [1, kv_heads, tokens, head_dim]
        per_window.append({kind: [getattr(layer, kind).flatten(0, 2).float() for layer in layers] for kind in KINDS})
    return {kind: [torch.cat(parts) for parts in zip(*(w[kind] for w in per_window))] for kind in KINDS}


def stratified_sample(layers: list[Tensor], total: int, seed: int) -> Tensor:
    """The same number of random vectors from each layer, stacked layer by layer."""
    generator = torch.Generator().manual_seed(seed)
    each = min(total // len(layers), min(len(x) for x in layers))
    return torch.stack([x[torch.randperm(len(x), generator=generator)[:each]] for x in layers])


def layer_records(kind: str, sample: Tensor, seed: int) -> list[dict]:
    """Records for a [layers, vectors, head_dim] sample of one kind; e8 ones also compare with scalar."""
    records = {}
    for method in METHODS:
        for bits in BITS:
            error, energy, total_bits = distortion(sample.flatten(0, 1), method, bits, seed)
            per_layer = error.view(len(sample), -1).sum(1) / energy.view(len(sample), -1).sum(1)
            records[method, bits] = dict(
                part="smollm2",
                kind=kind,
                method=method,
                bits=bits,
                vectors=error.numel(),
                layers=len(sample),
                dim=sample.shape[-1],
                total_bits=total_bits,
                rel_mse=(error.sum() / energy.sum()).item(),
                per_layer_rel_mse=per_layer.tolist(),
            )
    for bits in BITS:
        e8, scalar = records["e8", bits], records["scalar", bits]
        layer_ratios = torch.tensor(e8["per_layer_rel_mse"]) / torch.tensor(scalar["per_layer_rel_mse"])
        e8["ratio_vs_scalar"] = e8["rel_mse"] / scalar["rel_mse"]
        e8["worst_layer"] = int(layer_ratios.argmax())
        e8["worst_layer_ratio"] = layer_ratios.max().item()
    return list(records.values())


def real_part(text_dir: Path, windows: int, tokens: int, vectors: int, seed: int) -> list[dict]:
    from nexusquant_cache.models import load_smollm2

    model, tokenizer = load_smollm2()
    kv = capture_kv(model, austen_windows(tokenizer, text_dir, windows, tokens, seed))
    return [r for kind in KINDS for r in layer_records(kind, stratified_sample(kv[kind], vectors, seed), seed)]


# --- 3. Throughput ---------------------------------------------------------------------------


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def throughput_part(n: int, dim: int, repeats: int, seed: int) -> list[dict]:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    cases: list[tuple[str, str | None, int | None, Callable[[], object]]] = [
        ("clone", None, None, x.clone),
        ("rotate", None, None, lambda: rotate(x, seed)),
    ]
    for method in METHODS:
        for bits in BITS:
            encoded = encode(x, bits, method, seed)
            cases.append(("encode", method, bits, lambda m=method, b=bits: encode(x, b, m, seed)))
            cases.append(("decode", method, bits, lambda e=encoded: decode(e)))
            # What rotated-domain attention reads: codeword units in float32, no inverse rotation.
            cases.append(("decode_units", method, bits, lambda e=encoded: decode_units(e)))
    records = []
    for op, method, bits, fn in cases:
        seconds = best_time(fn, repeats)
        records.append(
            dict(
                part="throughput",
                op=op,
                method=method,
                bits=bits,
                dim=dim,
                vectors=n,
                repeats=repeats,
                threads=torch.get_num_threads(),
                seconds=seconds,
                vectors_per_s=n / seconds,
            )
        )
    return records


# --- Tables and plot -------------------------------------------------------------------------


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def gaussian_table(records: list[dict]) -> str:
    header = ["d", "method", "bits", "total bits/number", "rel. MSE", "2^(-2 total)", "2^(-2 bits)"]
    header.append("gap to 2^(-2 total)")
    rows = []
    for r in records:
        gap = 10 * math.log10(r["rel_mse"] / r["bound_total_bits"])
        rows.append(
            [
                r["dim"],
                r["method"],
                r["bits"],
                f"{r['total_bits']:.3f}",
                f"{r['rel_mse']:.4f}",
                f"{r['bound_total_bits']:.4f}",
                f"{r['bound_code_bits']:.4f}",
                f"{gap:.2f} dB",
            ]
        )
    return f"{records[0]['vectors']:,} i.i.d. N(0, 1) vectors per d.\n\n" + table(header, rows)


def real_table(records: list[dict]) -> str:
    header = ["kind", "bits", "total bits/number", "scalar rel. MSE", "e8 rel. MSE", "e8 / scalar"]
    header.append("worst layer e8 / scalar")
    scalar = {(r["kind"], r["bits"]): r for r in records if r["method"] == "scalar"}
    rows = []
    for r in (r for r in records if r["method"] == "e8"):
        rows.append(
            [
                r["kind"],
                r["bits"],
                f"{r['total_bits']:.3f}",
                f"{scalar[r['kind'], r['bits']]['rel_mse']:.4f}",
                f"{r['rel_mse']:.4f}",
                f"{r['ratio_vs_scalar']:.3f}",
                f"{r['worst_layer_ratio']:.3f} (layer {r['worst_layer']})",
            ]
        )
    n, layers, dim = records[0]["vectors"], records[0]["layers"], records[0]["dim"]
    caption = f"{n:,} vectors of d = {dim} per kind, {n // layers:,} from each of {layers} layers"
    return f"{caption}; worst layer: the largest per-layer e8 / scalar ratio.\n\n" + table(header, rows)


def throughput_table(records: list[dict]) -> str:
    header = ["operation", "method", "bits", "vectors/s", "input MB/s (fp32)"]
    rows = [
        [
            r["op"],
            r["method"] or "-",
            r["bits"] or "-",
            f"{r['vectors_per_s']:,.0f}",
            f"{r['vectors_per_s'] * r['dim'] * 4 / 1e6:,.0f}",
        ]
        for r in records
    ]
    n, repeats = records[0]["vectors"], records[0]["repeats"]
    return f"{n:,} float32 vectors; best of {repeats} runs after a warm-up.\n\n" + table(header, rows)


def plot(gaussian: list[dict], real: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [("Gaussian d=128", "C0", [r for r in gaussian if r["dim"] == 128])]
    for kind, color in zip(KINDS, ("C1", "C2")):
        curves.append((f"SmolLM2 {kind} d=64", color, [r for r in real if r["kind"] == kind]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, color, records in curves:
        for method, style in (("e8", "-o"), ("scalar", "--s")):
            points = sorted((r["total_bits"], r["rel_mse"]) for r in records if r["method"] == method)
            if points:
                ax.plot(*zip(*points), style, color=color, label=f"{label}, {method}")
    rates = torch.linspace(2, 4.5, 50)
    ax.plot(rates, 2 ** (-2 * rates), ":", color="black", label="Shannon bound $2^{-2R}$")
    ax.set(yscale="log", xlabel="total bits per number R (codes + bf16 scale)", ylabel="relative MSE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    """The CPU model, from /proc/cpuinfo where there is one."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def write_docs(sections: list[tuple[str, str]], timings: dict[str, float], threads: int) -> None:
    command = shlex.join(["PYTHONPATH=src", "python", "benchmarks/codec.py", *sys.argv[1:]])
    took = ", ".join(f"{part} {seconds:.0f} s" for part, seconds in timings.items())
    lines = [
        "# Codec results",
        "",
        f"Generated by `{command}` on {datetime.date.today().isoformat()}: torch {torch.__version__}, "
        f"{threads} CPU threads, {cpu_name()}; parts took {took}.",
        "",
        "Relative MSE is sum ||x - x^||^2 / sum ||x||^2. Total bits per number include each vector's bf16 scale "
        "(16 / d). The Shannon bound 2^(-2R) is the least relative MSE any code of R bits per number can reach "
        "on Gaussian data.",
        "",
        "![relative MSE against total bits per number](codec.png)",
    ]
    for title, body in sections:
        lines += ["", f"## {title}", "", body]
    (REPO / "docs").mkdir(exist_ok=True)
    (REPO / "docs" / "codec-results.md").write_text("\n".join(lines) + "\n")


# --- Main ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    gaussian: int  # vectors per d
    windows: int  # Austen windows
    tokens: int  # tokens per window
    real_vectors: int  # sampled KV vectors per kind
    speed_vectors: int
    repeats: int


FULL = Sizes(gaussian=20_000, windows=6, tokens=1024, real_vectors=200_000, speed_vectors=131_072, repeats=3)
QUICK = Sizes(gaussian=2_000, windows=2, tokens=128, real_vectors=6_000, speed_vectors=4_096, repeats=1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    parser.add_argument("--no-real", action="store_true", help="skip the SmolLM2 part")
    parser.add_argument("--write-docs", action="store_true", help="write docs/codec-results.md and docs/codec.png")
    parser.add_argument("--text-dir", type=Path, default=TEXT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if args.quick and args.write_docs:
        parser.error("--write-docs records the full run; drop --quick")
    return args


def main() -> None:
    args = parse_args()
    size = QUICK if args.quick else FULL
    torch.set_num_threads(args.threads)
    parts: dict[str, tuple[str, Callable[[], list[dict]], Callable[[list[dict]], str]]] = {
        "gaussian": ("Gaussian vectors", lambda: gaussian_part(size.gaussian, (64, 128), args.seed), gaussian_table),
        "smollm2": (
            f"SmolLM2-135M keys and values, {size.windows} Austen windows of {size.tokens} tokens",
            lambda: real_part(args.text_dir, size.windows, size.tokens, size.real_vectors, args.seed),
            real_table,
        ),
        "throughput": (
            f"Throughput, d = 128, {args.threads} threads",
            lambda: throughput_part(size.speed_vectors, 128, size.repeats, args.seed),
            throughput_table,
        ),
    }
    if args.no_real:
        del parts["smollm2"]
    results, timings, sections = {}, {}, []
    for name, (title, run, make_table) in parts.items():
        start = time.perf_counter()
        results[name] = run()
        timings[name] = time.perf_counter() - start
        log(f"[{name}] {timings[name]:.1f} s")
        emit(results[name])
        sections.append((title, make_table(results[name])))
    for title, body in sections:
        print(f"\n## {title}\n\n{body}")
    if args.write_docs:
        write_docs(sections, timings, args.threads)
        plot(results["gaussian"], results.get("smollm2", []), REPO / "docs" / "codec.png")
        log("wrote docs/codec-results.md and docs/codec.png")


if __name__ == "__main__":
    main()
