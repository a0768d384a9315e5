"""The benchmarks run end to end and their records say what the docs claim."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``benchmarks/<script>`` with ``args``; fails on a non-zero exit."""
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)


def test_codec_benchmark_quick_run():
    result = run_benchmark("codec.py", "--quick", "--no-real", timeout=300)
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    gaussian = {(r["dim"], r["method"], r["bits"]): r for r in records if r["part"] == "gaussian"}
    assert len(gaussian) == 12
    for (dim, method, bits), record in gaussian.items():
        if method == "e8":
            assert record["rel_mse"] < gaussian[dim, "scalar", bits]["rel_mse"]
        assert record["total_bits"] == bits + 16 / dim
        assert record["rel_mse"] > record["bound_total_bits"]  # no code beats Shannon
    assert any(r["part"] == "throughput" for r in records)


@pytest.mark.real_model
def test_cache_quality_benchmark_small_run():
    result = run_benchmark(
        "cache_quality.py",
        *("--windows", "1", "--context", "512", "--score", "64", "--configs", "K4V4 keep 0.5", "hqq:4"),
        *("--text", "python-docs"),  # a user's clone has no Austen folder
    )
    records = {r["method"]: r for r in map(json.loads, (x for x in result.stdout.splitlines() if x.startswith("{")))}
    assert records["DynamicCache"]["ppl_change"] == 0 and records["DynamicCache"]["ratio"] == 1
    compressed = records["K4V4 keep 0.5"]
    assert compressed["ratio"] > 2 and compressed["kl"] > 0  # real bytes saved, a real (small) loss
    # Our window and sink keys are float16 already; only the float32 key offsets and scales (a few kB) are not.
    assert compressed["ratio_16bit"] == pytest.approx(compressed["ratio"], rel=0.02)
    peer = records["hqq int4"]  # a method spec runs the peer in the same harness
    assert peer["kl"] > 0 and peer["ratio_16bit"] > peer["ratio"] > 1  # its float32 residual halves at 16 bits


def test_results_plot_draws_each_figure_from_the_records(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from results_plot import family, pareto
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert pareto([(4, 1.0), (8, 3.0), (8, 2.0), (6, 2.5), (16, 5.0)]) == [(4, 1.0), (8, 2.0), (16, 5.0)]
    names = ["K4V2 keep 0.5", "16-bit keep 0.5 h2o", "quanto int4", "K3V2 keep 0.5 scalar", "kvpress SnapKVPress(0.5)"]
    assert [family(n) for n in names] == ["ours", "eviction", "quantized", "scalar", "kvpress"]
    lines = [json.dumps(dict(method=n, ratio=2.0 + i, ppl_change=0.01 * i, kl=0.002 * i)) for i, n in enumerate(names)]
    (tmp_path / "smol4k-peers.out").write_text("| a markdown row |\n" + "\n".join(lines) + "\n")
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "results_plot.py"), str(tmp_path)], check=True)
    assert (tmp_path / "results-smollm2-4k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "results-gemma3-4k.png").exists()  # no records, no figure


@pytest.mark.real_model
def test_prefill_memory_benchmark_small_run():
    result = run_benchmark("prefill_memory.py", *("--context", "96", "--chunk", "32", "--text", "python-docs"))
    records = {r["variant"]: r for r in map(json.loads, (x for x in result.stdout.splitlines() if x.startswith("{")))}
    assert len(records) == 5 and all(r["chunk"] in (32, 96) for r in records.values())
    dynamic, ours = records["DynamicCache, chunked"], records["NexusQuantCache K4V4, chunked"]
    # SmolLM2: layers, keys and values, KV heads, 96 + 8 decoded tokens, head_dim, float32
    assert dynamic["cache_bytes"] == 30 * 2 * 3 * (96 + 8) * 64 * 4
    assert 0 < ours["cache_bytes"] < dynamic["cache_bytes"] / 2  # under a 16-bit cache, though most is window here


@pytest.mark.real_model
def test_cache_speed_benchmark_small_run():
    result = run_benchmark(
        "cache_speed.py",
        *("--contexts", "256", "--methods", "dynamic", "nq:preset=compact", "--prefill-chunk", "128"),
        *("--rounds", "1", "--steps", "2"),
    )
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:-1]
        for line in result.stdout.splitlines()
        if "| NQ" in line or "| Dyn" in line
    }
    assert set(rows) == {"DynamicCache", "NQ compact"}
    held = rows["NQ compact"][-1]  # "x MB (0.yyx)": real bytes held against DynamicCache's
    assert float(held.split("(")[1].rstrip("x) ")) < 0.5
    assert rows["NQ compact"][3].strip().endswith("x")  # a decode ratio to DynamicCache in the same run


@pytest.mark.real_model
def test_page_size_benchmark_small_run():
    result = run_benchmark("page_size.py", *("--contexts", "400", "--page-tokens", "64", "--steps", "3"))
    row = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| 400 ")][0]
    assert int(row[2]) >= 3 and row[-1].strip().endswith("x")  # several pages, timed against one page
