"""Results: JSON (one record per model x method x metric x setting), a markdown report, plots.

A record is a plain dict: ``model``, ``method``, ``metric``, ``setting`` (dict), ``value``
(None when ``unavailable`` says why), ``unit`` and metric details (``per_window`` /
``per_trial``, ``std``, ``vs_dynamic``, ``ratio``...). Nothing here is pickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["FORMAT", "load_results", "markdown", "plot", "save_results"]

FORMAT = "nexusquant-eval/1"


def save_results(path: str | os.PathLike, records: list[dict], meta: dict | None = None) -> Path:
    """Write ``{"format", "meta", "records"}`` as JSON to ``path`` (atomically)."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"format": FORMAT, "meta": meta or {}, "records": records}, indent=1) + "\n")
    temporary.replace(path)
    return path


def load_results(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """``(meta, records)`` of a file :func:`save_results` wrote."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not an evaluation result file of format {FORMAT!r} (format {found!r})")
    return data["meta"], data["records"]


def markdown(records: list[dict]) -> str:
    """A summary table per model (one row per method) and, when measured, the copy-recall grid
    and the pass-key rates by depth."""
    out = []
    for model in _unique(r.get("model", "model") for r in records):
        mine = [r for r in records if r.get("model", "model") == model]
        out += [f"## {model}", "", *_summary(mine), ""]
        copy = [r for r in mine if r["metric"] == "copy_recall" and r["value"] is not None]
        if copy:
            columns = _unique((r["setting"]["depth"], r["setting"]["span"]) for r in copy)
            header = [f"depth {d:g}, span {s}" for d, s in columns]
            out += [f"Copy recall (fraction of span tokens, context {copy[0]['setting']['context']}):", ""]
            out += _table(
                ["method", *header], _grid(copy, columns, lambda r: (r["setting"]["depth"], r["setting"]["span"]))
            )
            out.append("")
        keys = [r for r in mine if r["metric"] == "passkey" and r["value"] is not None]
        if keys:
            columns = _unique(r["setting"]["depth"] for r in keys)
            out += [
                f"Pass key (success rate over {keys[0]['setting']['trials']} trials, context "
                f"{keys[0]['setting']['context']}):",
                "",
            ]
            out += _table(
                ["method", *(f"depth {d:g}" for d in columns)], _grid(keys, columns, lambda r: r["setting"]["depth"])
            )
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def plot(records: list[dict], folder: str | os.PathLike) -> list[Path]:
    """One PNG per model, ``quality_vs_ratio_<model>.png``: perplexity change, KL and (when
    measured) copy recall and pass key against the real compression ratio. Needs matplotlib;
    without it, returns [] (the JSON and markdown hold the same numbers)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for model in _unique(r.get("model", "model") for r in records):
        mine = [r for r in records if r.get("model", "model") == model and r["value"] is not None]
        ratio = {r["method"]: r["ratio"] for r in mine if r["metric"] == "bytes"}
        panels = [
            ("perplexity", lambda r: 100 * r["change"], "perplexity change (%)"),
            ("kl", lambda r: r["value"], "KL vs uncompressed (nats/token)"),
            ("copy_recall", None, "copy recall (mean over settings)"),
            ("passkey", None, "pass key success (mean over depths)"),
        ]
        panels = [p for p in panels if any(r["metric"] == p[0] and r["method"] in ratio for r in mine)]
        if not panels:
            continue
        figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for axis, (metric, value, label) in zip(axes[0], panels):
            points = _points(mine, metric, value, ratio)
            for name, (x, y) in points.items():
                axis.scatter(x, y, s=24)
                axis.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            axis.set_xlabel("real compression ratio vs 16-bit DynamicCache")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        figure.suptitle(f"{model}: quality against real compression")
        figure.tight_layout()
        path = Path(folder) / f"quality_vs_ratio_{_slug(model)}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def _points(records, metric, value, ratio) -> dict:
    points = {}
    for method in ratio:
        chosen = [r for r in records if r["metric"] == metric and r["method"] == method]
        if chosen:
            y = value(chosen[0]) if value else sum(r["value"] for r in chosen) / len(chosen)
            points[method] = (ratio[method], y)
    return points


def _summary(records: list[dict]) -> list[str]:
    methods = _unique(r["method"] for r in records if r["method"] != "reference")
    by = {(r["method"], r["metric"]): r for r in records}  # the last setting of a metric wins below
    columns = [
        "method",
        "ratio",
        "bytes",
        "perplexity",
        "change",
        "KL (nats)",
        "copy recall",
        "pass key",
        "prefill",
        "compression",
        "decode tok/s",
        "peak memory (decode)",
    ]
    rows = []
    for method in methods:
        missing = next((r["unavailable"] for r in records if r["method"] == method and r.get("unavailable")), None)
        if missing and not any(r["method"] == method and r["value"] is not None for r in records):
            rows.append([method, f"unavailable: {missing}"] + [""] * (len(columns) - 2))
            continue
        held, ppl, kl = by.get((method, "bytes")), by.get((method, "perplexity")), by.get((method, "kl"))
        rows.append(
            [
                method,
                _fmt(held, lambda r: f"{r['ratio']:.2f}x"),
                _fmt(held, lambda r: _size(r["value"])),
                _fmt(ppl, lambda r: f"{r['value']:.3f} ± {r['std']:.2f}"),
                _fmt(ppl, lambda r: f"{100 * r['change']:+.2f}% ± {100 * r['change_std']:.2f}"),
                _fmt(kl, lambda r: f"{r['value']:.4f} ± {r['std']:.4f}"),
                _mean(records, method, "copy_recall"),
                _mean(records, method, "passkey"),
                _fmt(by.get((method, "prefill_time")), lambda r: f"{r['value']:.2f} s ({r['vs_dynamic']:.2f}x)"),
                _fmt(by.get((method, "compression_time")), _compression),
                _fmt(by.get((method, "decode_tokens_per_s")), lambda r: f"{r['value']:.1f} ({r['vs_dynamic']:.2f}x)"),
                _fmt(by.get((method, "peak_memory")), _memory),
            ]
        )
    keep = [i for i, c in enumerate(columns) if i == 0 or any(row[i] not in ("", "-") for row in rows)]
    lines = _table([columns[i] for i in keep], [[row[i] for i in keep] for row in rows])
    reference = by.get(("reference", "perplexity"))
    if reference:
        lines.append(
            f"\nUncompressed reference perplexity {reference['value']:.3f} over {reference['setting']['windows']} "
            f"windows of {reference['setting']['context']} tokens ({reference['setting']['scored']} scored)."
        )
    return lines


def _compression(record) -> str:
    if record["value"] is None:
        return "in prefill"
    return f"{record['value']:.2f} s ({record['vs_dynamic']:.2f}x prefill)"


def _memory(record) -> str:
    text = _size(record["value"])
    return text if record.get("vs_dynamic") is None else f"{text} ({record['vs_dynamic']:.2f}x)"


def _mean(records, method, metric) -> str:
    values = [r["value"] for r in records if r["method"] == method and r["metric"] == metric and r["value"] is not None]
    return f"{sum(values) / len(values):.3f}" if values else "-"


def _grid(records, columns, key) -> list[list[str]]:
    cells = {(r["method"], key(r)): r for r in records}
    return [
        [method, *(f"{cells[method, c]['value']:.3f}" if (method, c) in cells else "-" for c in columns)]
        for method in _unique(r["method"] for r in records)
    ]


def _fmt(record, show) -> str:
    if record is None:
        return "-"
    if record.get("value") is None and record.get("unavailable"):
        return "unavailable"
    return show(record)


def _size(count) -> str:
    if count is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return str(count)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "model"
