"""Cost metrics: prefill time, compression time, decode speed, and peak process memory.

Times are wall-clock on whatever else the machine runs, so each comes with its ratio to a
DynamicCache measured in the same call. Peak memory is measured in a fresh process per method
(``python -m nexusquant_cache.eval.efficiency``): the process loads the model, then Linux's
``/proc/self/clear_refs`` resets its peak resident set size (VmHWM) before the prefill and
again before decoding, so the peaks are those of the prefill and of decoding alone, above the
loaded model (after one warm-up forward: the weights are memory-mapped and count
once touched). Where that reset is not allowed, ``ru_maxrss`` is used and the record says so
(``how``); that peak then includes loading the model.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..cache import prefill
from .methods import Method, cache_bytes, dynamic, parse_method
from .quality import split_available

__all__ = ["peak_memory", "speed"]

Progress = Callable[[str], None]


@torch.inference_mode()
def speed(
    model,
    ids: torch.Tensor,
    methods: Sequence[Method | str],
    decode_tokens: int = 32,
    prefill_chunk: int | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Prefill time, compression time and greedy decode speed of each method on ``ids`` [1, T].

    - ``prefill_time``: seconds to run the prompt into the cache (``prefill_chunk`` tokens per
      forward; None: one forward).
    - ``compression_time``: seconds of the first settle of every layer after the prefill (for
      NexusQuantCache: evicting and encoding what left the window); 0 for DynamicCache; None
      for QuantizedCache, which quantizes inside the prefill's forward (so it is in
      ``prefill_time``). Its ``vs_dynamic`` is against DynamicCache's prefill time.
    - ``decode_tokens_per_s``: ``decode_tokens`` greedy single-token steps after that.

    Each record's ``vs_dynamic`` is the ratio to a DynamicCache run in this call (the first
    ``dynamic`` method given, else one run for the purpose). The first forward of a process is
    slow, so one short warm-up forward runs first."""
    methods = [parse_method(m) for m in methods]
    if decode_tokens < 1:
        raise ValueError(f"`decode_tokens` must be >= 1 but got {decode_tokens}")
    ids = torch.as_tensor(ids)[None] if torch.as_tensor(ids).dim() == 1 else torch.as_tensor(ids)
    ids = ids.to(model.device)
    available, records = split_available(methods, model, ("prefill_time", "compression_time", "decode_tokens_per_s"))
    prefill(model, ids[:, :16], dynamic().build(model))  # warm-up
    reference = next((m for m in available if m.kind == "dynamic"), None)
    runs = {}
    for method in ([] if reference else [dynamic("reference")]) + available:
        if progress:
            progress(f"speed: {method.name}")
        runs[method.name] = _time(model, ids, method, decode_tokens, prefill_chunk)
    base = runs[reference.name if reference else "reference"]
    setting = {"context": ids.shape[1], "decode_tokens": decode_tokens, "prefill_chunk": prefill_chunk}
    for method in available:
        run = runs[method.name]
        compression = run["compression_s"]
        records += [
            _record("prefill_time", method, setting, run["prefill_s"], "s", run["prefill_s"] / base["prefill_s"]),
            _record(
                "compression_time",
                method,
                setting,
                compression,
                "s",
                None if compression is None else compression / base["prefill_s"],
            ),
            _record(
                "decode_tokens_per_s",
                method,
                setting,
                run["tokens_per_s"],
                "tokens/s",
                run["tokens_per_s"] / base["tokens_per_s"],
            ),
        ]
        if compression is None:
            records[-2]["note"] = "quantizes inside the prefill's forward: included in prefill_time"
        else:
            records[-2]["share_of_prefill"] = compression / run["prefill_s"]
    return records


def peak_memory(
    model_source: str,
    ids: torch.Tensor,
    methods: Sequence[Method | str],
    decode_tokens: int = 32,
    dtype: str = "float32",
    threads: int = 2,
    prefill_chunk: int | None = 512,
    progress: Progress | None = None,
    timeout: float = 1800,
) -> list[dict]:
    """Peak process memory of prefilling ``ids`` [1, T] and decoding ``decode_tokens`` greedy
    tokens, each method in a fresh process that loads ``model_source`` (``smollm2``, ``gemma3``,
    a model folder or a transformers model name).

    Record ``peak_memory``: ``value`` is the peak resident memory while decoding, above the
    process with the model loaded (so it holds the cache, the activations and any transient
    buffers, e.g. codes decoded for attention); ``prefill_peak`` the same for the prefill;
    ``after_prefill`` what stayed resident after it; ``held`` the storage of the cache's tensors
    after decoding, at the dtypes they are held in; ``prefill_s`` the prefill's seconds (with
    compression); ``vs_dynamic`` the ratio of ``value`` to DynamicCache's (when it is among
    ``methods``). The prefill runs ``prefill_chunk`` tokens per
    forward (None: one) and keeps only the last position's logits, so logits do not dominate."""
    methods = [parse_method(m) for m in methods]
    ids = torch.as_tensor(ids).reshape(-1).tolist()
    records, results = [], {}
    for method in methods:
        if progress:
            progress(f"peak memory: {method.name} (fresh process)")
        spec = dict(
            model=model_source,
            dtype=dtype,
            threads=threads,
            ids=ids,
            method=method.to_dict(),
            decode_tokens=decode_tokens,
            prefill_chunk=prefill_chunk,
        )
        done = subprocess.run(
            [sys.executable, "-m", "nexusquant_cache.eval.efficiency"],
            input=json.dumps(spec),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_SRC, os.environ.get("PYTHONPATH")]))},
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        result = json.loads(lines[-1]) if done.returncode == 0 and lines else None
        setting = {"context": len(ids), "decode_tokens": decode_tokens, "prefill_chunk": prefill_chunk}
        if result is None or "unavailable" in result:
            reason = result["unavailable"] if result else _last_error(done.stderr, done.returncode)
            records.append(
                {
                    "metric": "peak_memory",
                    "method": method.name,
                    "setting": setting,
                    "value": None,
                    "unavailable": reason,
                }
            )
            continue
        results[method.name] = result
        record = _record("peak_memory", method, setting, result["decode_peak"], "bytes", None)
        record |= {
            key: result[key] for key in ("prefill_peak", "after_prefill", "held", "prefill_s", "model_rss", "how")
        }
        records.append(record)
    reference = next((m.name for m in methods if m.kind == "dynamic" and m.name in results), None)
    for record in records:
        if reference and record["value"] is not None:
            record["vs_dynamic"] = record["value"] / max(results[reference]["decode_peak"], 1)
    return records


_SRC = str(Path(__file__).resolve().parents[2])  # the folder holding the package, for the child


def _time(model, ids: torch.Tensor, method: Method, decode_tokens: int, prefill_chunk: int | None) -> dict:
    cache = method.build(model)
    started = time.perf_counter()
    logits = prefill(model, ids, cache, prefill_chunk)
    prefill_s = time.perf_counter() - started
    started = time.perf_counter()
    for layer in cache.layers:
        getattr(layer, "settle", lambda: None)()  # only NexusQuantCache defers its compression
    compression_s = time.perf_counter() - started
    if method.kind == "dynamic":
        compression_s = 0.0
    elif method.kind == "quantized":
        compression_s = None
    started = time.perf_counter()
    _decode(model, ids.shape[1], cache, logits, decode_tokens)
    return dict(
        prefill_s=prefill_s, compression_s=compression_s, tokens_per_s=decode_tokens / (time.perf_counter() - started)
    )


def _decode(model, position: int, cache, logits: torch.Tensor, steps: int) -> None:
    """Greedy decoding, one token per forward (decoding is sequential by nature)."""
    token = logits.argmax(-1).reshape(1, 1)
    for step in range(steps):
        positions = torch.tensor([[position + step]], device=token.device)
        token = model(token, cache=cache, position_ids=positions).logits[:, -1].argmax(-1, keepdim=True)


def _record(metric: str, method: Method, setting: dict, value, unit: str, vs_dynamic) -> dict:
    return {
        "metric": metric,
        "method": method.name,
        "setting": dict(setting),
        "value": value,
        "unit": unit,
        "vs_dynamic": vs_dynamic,
    }


def _last_error(stderr: str, returncode: int) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"the measuring process exited with status {returncode}"


def _status(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def _peak(resettable: bool) -> int:
    if resettable:
        return _status("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@torch.inference_mode()
def _child() -> None:
    """Measure one method as :func:`peak_memory` asks (a JSON spec on stdin, one JSON line out)."""
    import gc

    from ..models import load_model
    from .methods import Method, unavailable_reason

    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    model, _ = load_model(spec["model"], spec["dtype"], tokenizer=False)
    method = Method.from_dict(spec["method"])
    reason = unavailable_reason(method, model)
    if reason is not None:
        print(json.dumps({"unavailable": reason}))
        return
    ids = torch.tensor([spec["ids"]], device=model.device)
    # Weights are memory-mapped: one full forward makes them all resident before measuring.
    model(ids[:, :8], cache=dynamic().build(model))
    cache = method.build(model)
    gc.collect()
    before = _status("VmRSS")
    resettable = _reset_peak()
    started = time.perf_counter()
    logits = prefill(model, ids, cache, spec["prefill_chunk"])
    for layer in cache.layers:
        getattr(layer, "settle", lambda: None)()
    prefill_s = time.perf_counter() - started
    prefill_peak, after_prefill = _peak(resettable), _status("VmRSS")
    resettable = resettable and _reset_peak()
    _decode(model, ids.shape[1], cache, logits, spec["decode_tokens"])
    decode_peak = _peak(resettable)
    print(
        json.dumps(
            {
                "model_rss": before,
                "prefill_peak": prefill_peak - before,
                "after_prefill": after_prefill - before,
                "decode_peak": decode_peak - before,
                "held": cache_bytes(cache)["tensor_bytes"],
                "prefill_s": prefill_s,
                "how": "VmHWM reset" if resettable else "ru_maxrss (includes loading the model)",
            }
        )
    )


if __name__ == "__main__":
    _child()
