"""The Pareto plots of docs/results.md: perplexity change and KL against the real compression
ratio, one figure per model at 4k context (2k and 8k have a few points each: tables only),
from the ``*.out`` files benchmarks/results.sh writes (one JSON line per method, as
cache_quality.py and kvpress_crosscheck.py print them).

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
    "results-gemma3-4k.png": ("Gemma-3-270m, 4k context", ["gemma4k", "gemma4k-more"], [(6, 2)]),
}
FAMILIES = {  # label, marker, colour
    "ours": ("NexusQuantCache (E8 + eviction)", "o", "tab:blue"),
    "eviction": ("eviction only, 16-bit (our scorers)", "s", "tab:orange"),
    "scalar": ("baselines.md combination: scalar quantizer (+ SnapKV)", "v", "tab:brown"),
    "quantized": ("transformers QuantizedCache", "^", "tab:green"),
    "kvpress": ("kvpress SnapKVPress", "D", "tab:purple"),
}


def ratio(record: dict) -> float:
    """The ratio when the model runs in 16 bits (fair to caches whose float32 parts would halve);
    kvpress prints token counts (16-bit already), and ours hold float16 windows, so for rows
    without the column both ratios agree."""
    return record.get("ratio_16bit", record["ratio"])


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
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = ((axes[0], "ppl_change", 100, "perplexity change (%)"), (axes[1], "kl", 1, "KL vs uncompressed (nats)"))
    for axis, key, scale, label in panels:
        # Collapsed peers (2-bit QuantizedCache: +300%) would flatten the rest: they sit on the
        # top edge with their value in the label.
        top = 1.6 * max(scale * r[key] for r in records if family(r["method"]) in ("ours", "eviction", None))
        off_scale = 0
        for name, (legend, marker, colour) in FAMILIES.items():
            mine = [r for r in records if family(r["method"]) == name]
            if not mine:
                continue
            ys = [min(scale * r[key], top) for r in mine]
            axis.scatter([ratio(r) for r in mine], ys, marker=marker, c=colour, label=legend)
            for r, y in zip(mine, ys):
                clipped = y != scale * r[key]
                text = f"{r['method']} ({scale * r[key]:.4g}, off scale)" if clipped else r["method"]
                offset = (3, -10 * off_scale if clipped else 3)  # stack the clipped labels
                off_scale += clipped
                axis.annotate(text, (ratio(r), y), fontsize=6, xytext=offset, textcoords="offset points")
            if name == "ours":
                axis.plot(*zip(*pareto([(ratio(r), scale * r[key]) for r in mine])), c=colour, lw=1, alpha=0.6)
        if key == "ppl_change":
            for x, y in targets:
                first = (x, y) == targets[0]
                axis.scatter([x], [y], marker="*", s=120, c="tab:red", label="target (at most)" if first else None)
        axis.set_ylim(min(0, axis.get_ylim()[0]), top * 1.08)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("bytes held vs a 16-bit DynamicCache, model in 16 bits (log scale)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=7)
    figure.suptitle(f"{title}: quality against real compression (8 Emma windows, 512 tokens scored each)")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
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
