"""The Pareto plots of docs/results.md: perplexity change and KL against the real compression
ratio, one figure per model and context, from the ``*.out`` files benchmarks/results.sh writes
(one JSON line per method, as cache_quality.py and kvpress_crosscheck.py print them).

    python benchmarks/results_plot.py results-out --to docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# figure file -> (title, runs drawn in it, targets as (ratio, perplexity change %))
FIGURES = {
    "results-smollm2-4k.png": (
        "SmolLM2-135M, 4k context",
        ["smol4k-ours", "smol4k-peers", "smol4k-scalar", "kvpress"],
        [(8, 1.5), (16, 3)],
    ),
    "results-smollm2-2k.png": ("SmolLM2-135M, 2k context", ["smol2k"], []),
    "results-smollm2-8k.png": ("SmolLM2-135M, 8k context", ["smol8k"], []),
    "results-gemma3-4k.png": ("Gemma-3-270m, 4k context", ["gemma4k"], [(6, 2)]),
}
FAMILIES = {  # label, marker, colour
    "ours": ("NexusQuantCache (E8 + eviction)", "o", "tab:blue"),
    "eviction": ("eviction only, 16-bit (our scorers)", "s", "tab:orange"),
    "scalar": ("baselines.md combination: scalar quantizer (+ SnapKV)", "v", "tab:brown"),
    "quantized": ("transformers QuantizedCache", "^", "tab:green"),
    "kvpress": ("kvpress SnapKVPress", "D", "tab:purple"),
}


def family(method: str) -> str | None:
    if method == "DynamicCache":
        return None
    if method.startswith("kvpress"):
        return "kvpress"
    if method.startswith(("quanto", "hqq", "QuantizedCache")):
        return "quantized"
    if method.endswith("scalar"):
        return "scalar"
    return "eviction" if method.startswith("16-bit") else "ours"


def read_runs(folder: Path, names: list[str]) -> list[dict]:
    records = []
    for name in names:
        path = folder / f"{name}.out"
        if path.exists():
            lines = path.read_text().splitlines()
            records += [json.loads(line) for line in lines if line.startswith("{") and '"ppl_change"' in line]
    return records


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both ratio (higher) and damage (lower)."""
    front, best = [], float("inf")
    for x, y in sorted(points, key=lambda p: (-p[0], p[1])):
        if y < best:
            front.append((x, y))
            best = y
    return sorted(front)


def draw(title: str, records: list[dict], targets: list[tuple[float, float]], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, key, label in ((axes[0], "ppl_change", "perplexity change (%)"), (axes[1], "kl", "KL vs uncompressed")):
        scale = 100 if key == "ppl_change" else 1
        for name, (legend, marker, colour) in FAMILIES.items():
            mine = [r for r in records if family(r["method"]) == name]
            if not mine:
                continue
            axis.scatter(
                [r["ratio"] for r in mine], [scale * r[key] for r in mine], marker=marker, c=colour, label=legend
            )
            for r in mine:
                axis.annotate(
                    r["method"], (r["ratio"], scale * r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points"
                )
            if name == "ours":
                front = pareto([(r["ratio"], scale * r[key]) for r in mine])
                axis.plot(*zip(*front), c=colour, lw=1, alpha=0.6)
        if key == "ppl_change":
            for x, y in targets:
                axis.scatter(
                    [x], [y], marker="*", s=120, c="tab:red", label="target (at most)" if (x, y) == targets[0] else None
                )
            axis.set_ylim(-1, min(30, axis.get_ylim()[1]))  # quanto int2 (+300%) would flatten the rest
        axis.set_xscale("log", base=2)
        axis.set_xlabel("real compression ratio vs 16-bit DynamicCache (log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle(f"{title}: quality against real compression (8 Emma windows, 512 tokens scored each)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where results.sh wrote its *.out files")
    parser.add_argument("--to", type=Path, default=None, help="where the PNGs go (default: the folder)")
    args = parser.parse_args()
    target = args.to or args.folder
    for file_name, (title, runs, targets) in FIGURES.items():
        records = read_runs(args.folder, runs)
        if records:
            draw(title, records, targets, target / file_name)
            print(f"wrote {target / file_name}")


if __name__ == "__main__":
    main()
