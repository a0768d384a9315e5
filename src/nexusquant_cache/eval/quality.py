"""Quality metrics: perplexity and KL against the uncompressed run, copy recall, pass key.

Every metric follows one protocol: a prefix is prefilled into the method's cache, then a tail
of tokens enters the cache teacher-forced, ``chunk`` tokens per forward at their real
positions, as tokens do while decoding (so they are quantized once they leave the window and
evictions keep the budget while they arrive). The predictions for the tail tokens are scored.

Each function takes a list of :class:`~nexusquant_cache.eval.Method` and returns result
records (dicts: ``metric``, ``method``, ``setting``, ``value``, ``unit`` and details; see
docs/eval.md). A method whose optional backend is missing or fails gets records with
``value: None`` and ``unavailable``: the error.
"""

from __future__ import annotations

import math
import random
import statistics
import time
import weakref
from typing import Callable, Sequence

import torch

from ..cache import prefill
from .data import copy_prompt, passkey_prompt, random_span, spread_windows
from .methods import Method, cache_bytes, dynamic, parse_method, unavailable_reason

__all__ = ["copy_recall", "passkey", "perplexity_kl", "split_available", "tail_logits"]

Progress = Callable[[str], None]


@torch.inference_mode()
def tail_logits(
    model, prefix: torch.Tensor, tail: torch.Tensor, cache, chunk: int = 64, prefill_chunk: int | None = None
) -> tuple[torch.Tensor, float, float]:
    """Logits [len(tail), vocab] predicting each ``tail`` token, teacher-forced through ``cache``
    after ``prefix`` [1, T]; and the prefill and tail-scoring seconds.

    The tail enters the cache ``chunk`` tokens per forward at positions T, T+1, ...; its last
    token is never fed (nothing after it is scored)."""
    if chunk < 1:
        raise ValueError(f"`chunk` must be >= 1 but got {chunk}")
    started = time.perf_counter()
    logits = [prefill(model, prefix, cache, prefill_chunk)]
    prefill_seconds = time.perf_counter() - started
    started = time.perf_counter()
    tail = tail.to(prefix.device)[None]
    offset = prefix.shape[1]
    for begin in range(0, tail.shape[1] - 1, chunk):
        end = min(begin + chunk, tail.shape[1] - 1)
        positions = torch.arange(offset + begin, offset + end, device=prefix.device)[None]
        logits.append(model(tail[:, begin:end], cache=cache, position_ids=positions).logits[0])
    return torch.cat(logits).float(), prefill_seconds, time.perf_counter() - started


def perplexity_kl(
    model,
    windows: Sequence[Sequence[int]] | torch.Tensor,
    methods: Sequence[Method | str],
    score: int = 512,
    chunk: int = 64,
    prefill_chunk: int | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Perplexity of the last ``score`` tokens of each window and the mean KL divergence
    KL(uncompressed || method) of the next-token distributions, per window and pooled.

    Args:
        windows: token ids, one window per row (all the same length), e.g. from
            :func:`~nexusquant_cache.eval.data.spread_windows`.
        methods: what to compare; a DynamicCache reference is always run first, per window.
        score: tokens scored at the end of each window; the rest is the prefix.

    Returns records ``perplexity`` (value: pooled perplexity; ``change``: pooled change
    against the reference; ``per_window``), ``kl`` (nats per token) and ``bytes`` (held after
    the last token, mean over windows; ``ratio`` against a 16-bit DynamicCache of the same
    tokens), per method, plus the reference's own ``perplexity`` under ``reference``.
    """
    methods = [parse_method(m) for m in methods]
    windows = torch.as_tensor(windows if isinstance(windows, torch.Tensor) else list(windows), dtype=torch.long)
    if windows.dim() != 2 or not 0 < score < windows.shape[1]:
        raise ValueError(
            f"windows must be [count, length] token ids with 0 < score < length, but got shape "
            f"{list(windows.shape)} and score {score}"
        )
    device = model.device
    available, records = split_available(methods, model, ("perplexity", "kl", "bytes"))
    length = windows.shape[1]
    setting = {"context": length, "prefix": length - score, "scored": score, "windows": len(windows), "chunk": chunk}
    runs = {name: _Totals() for name in ["reference", *(m.name for m in available)]}
    for index, window in enumerate(windows):
        ids = window[None].to(device)
        prefix, tail = ids[:, :-score], ids[0, -score:]
        reference_cache = dynamic().build(model)
        reference, *seconds = tail_logits(model, prefix, tail, reference_cache, chunk, prefill_chunk)
        reference = reference.log_softmax(-1)
        baseline = cache_bytes(reference_cache)["bytes"]
        del reference_cache
        runs["reference"].add(_nll(reference, tail), 0.0, {"bytes": baseline}, baseline, seconds)
        for method in available:
            if progress:
                progress(f"perplexity/KL: window {index + 1}/{len(windows)}, {method.name}")
            cache = method.build(model)
            logprobs, *seconds = tail_logits(model, prefix, tail, cache, chunk, prefill_chunk)
            logprobs = logprobs.log_softmax(-1)
            kl = (reference.exp() * (reference - logprobs)).sum().item()
            runs[method.name].add(_nll(logprobs, tail), kl, cache_bytes(cache), baseline, seconds)
            del cache, logprobs
    reference = runs.pop("reference")
    records.extend(reference.records("reference", setting, reference, score))
    for method in available:
        records.extend(runs[method.name].records(method.name, setting, reference, score))
    return records


def copy_recall(
    model,
    tokenizer,
    methods: Sequence[Method | str],
    texts: list[tuple[str, str]],
    context: int = 2048,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    spans: Sequence[int] = (16, 64),
    cue: int = 4,
    trials: int = 1,
    seed: int = 0,
    chunk: int = 64,
    prefill_chunk: int | None = None,
    start_id: int | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Fraction of a planted span's tokens the model copies back, per depth and span length.

    A span of ``span`` tokens of seeded random common words is planted at ``depth`` (a fraction
    of the ``context``-token prefix, snapped back to a sentence end) in text from ``texts``;
    after the prefix the whole span is repeated, teacher-forced, and the score is the fraction of
    its tokens after the first ``cue`` that are the model's greedy (argmax) prediction.
    ``trials`` prompts (other filler, other words) per setting; ``value`` is their mean."""
    methods = [parse_method(m) for m in methods]
    available, records = split_available(methods, model, ("copy_recall",))
    fillers = spread_windows(tokenizer, texts, trials, context, start_id, phase=0.25)
    scores: dict[tuple, list[float]] = {}
    settings = [(depth, span) for depth in depths for span in spans]
    for trial, filler in enumerate(fillers):
        for depth, span in settings:
            words = random_span(tokenizer, span, seed * 1000 + trial * 100 + span)
            prompt = copy_prompt(filler, words, depth, context, cue, tokenizer)
            for method in available:
                if progress:
                    progress(f"copy recall: trial {trial + 1}/{trials}, depth {depth}, span {span}, {method.name}")
                hits = _greedy_hits(model, prompt, method, chunk, prefill_chunk)
                scores.setdefault((method.name, depth, span), []).append(hits.float().mean().item())
    for method in available:
        for depth, span in settings:
            values = scores[method.name, depth, span]
            setting = {"context": context, "depth": depth, "span": span, "cue": cue, "trials": trials}
            records.append(_record("copy_recall", method.name, setting, values, "fraction of span tokens"))
    return records


def passkey(
    model,
    tokenizer,
    methods: Sequence[Method | str],
    texts: list[tuple[str, str]],
    context: int = 2048,
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    trials: int = 4,
    seed: int = 0,
    chunk: int = 64,
    prefill_chunk: int | None = None,
    start_id: int | None = None,
    progress: Progress | None = None,
) -> list[dict]:
    """Pass-key retrieval rate per depth.

    ``The pass key is NNNNN. Remember it.`` (a seeded random 5-digit number) is planted at
    ``depth`` in text from ``texts``; the ``context``-token prefix ends with ``What is the pass
    key? The pass key is``. A trial succeeds when every token of the key is the model's greedy
    prediction given the ones before, which is exactly when greedy decoding writes the key.
    ``value`` is the success rate over ``trials`` prompts (other filler, other key)."""
    methods = [parse_method(m) for m in methods]
    available, records = split_available(methods, model, ("passkey",))
    fillers = spread_windows(tokenizer, texts, trials, context, start_id, phase=0.75)
    rng = random.Random(seed)
    keys = [str(rng.randrange(10_000, 100_000)) for _ in range(trials)]
    results: dict[tuple, list[float]] = {}
    for trial, (filler, key) in enumerate(zip(fillers, keys)):
        for depth in depths:
            prompt = passkey_prompt(tokenizer, filler, key, depth, context)
            for method in available:
                if progress:
                    progress(f"pass key: trial {trial + 1}/{trials}, depth {depth}, {method.name}")
                hits = _greedy_hits(model, prompt, method, chunk, prefill_chunk)
                results.setdefault((method.name, depth), []).append(float(hits.all()))
    for method in available:
        for depth in depths:
            setting = {"context": context, "depth": depth, "trials": trials}
            records.append(_record("passkey", method.name, setting, results[method.name, depth], "success rate"))
    return records


def _greedy_hits(model, prompt, method: Method, chunk: int, prefill_chunk: int | None) -> torch.Tensor:
    """Whether each scored tail token is the greedy prediction: bool [scored]."""
    device = model.device
    cache = method.build(model)
    logits, _, _ = tail_logits(model, prompt.prefix.to(device), prompt.tail, cache, chunk, prefill_chunk)
    return logits.argmax(-1)[prompt.targets].cpu() == prompt.tail[prompt.targets]


def _nll(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    return -logprobs.gather(-1, targets[:, None].to(logprobs.device)).sum().item()


class _Totals:
    """Per-window sums of one method in perplexity_kl."""

    def __init__(self):
        self.nll, self.kl, self.held, self.baseline, self.seconds = [], [], [], [], []

    def add(self, nll: float, kl: float, held: dict, baseline: int, seconds) -> None:
        self.nll.append(nll)
        self.kl.append(kl)
        self.held.append(held)
        self.baseline.append(baseline)
        self.seconds.append(tuple(seconds))

    def records(self, name: str, setting: dict, reference: "_Totals", score: int) -> list[dict]:
        ppl = [math.exp(nll / score) for nll in self.nll]
        change = [math.exp((nll - ref) / score) - 1 for nll, ref in zip(self.nll, reference.nll)]
        count = score * len(self.nll)
        perplexity = _record("perplexity", name, setting, ppl, "perplexity")
        perplexity["value"] = math.exp(sum(self.nll) / count)  # pooled over windows, as in baselines.md
        perplexity["change"] = math.exp((sum(self.nll) - sum(reference.nll)) / count) - 1
        perplexity["per_window_change"] = change
        perplexity["change_std"] = _std(change)
        perplexity["prefill_s"] = sum(s[0] for s in self.seconds)
        perplexity["scoring_s"] = sum(s[1] for s in self.seconds)
        if name == "reference":
            return [perplexity]
        kl = _record("kl", name, setting, [k / score for k in self.kl], "nats per token")
        kl["value"] = sum(self.kl) / count
        ratios = [base / held["bytes"] for base, held in zip(self.baseline, self.held)]
        held = _record("bytes", name, setting, [h["bytes"] for h in self.held], "bytes")
        held |= {
            "baseline_bytes": statistics.fmean(self.baseline),
            "ratio": statistics.fmean(ratios),
            "per_window_ratio": ratios,
            "tensor_bytes": statistics.fmean(h["tensor_bytes"] for h in self.held),
            "check": all(h["check"] for h in self.held),
            "bytes_16bit": statistics.fmean(h["bytes_16bit"] for h in self.held),
            "ratio_16bit": statistics.fmean(b / h["bytes_16bit"] for b, h in zip(self.baseline, self.held)),
            "parts": self.held[-1]["parts"],
        }
        if "baseline_bytes" in self.held[-1]:  # ours counts its own baseline: it must agree
            held["baseline_check"] = all(h["baseline_bytes"] == b for h, b in zip(self.held, self.baseline))
            held["per_window_guarded_layers"] = [h["guarded_layers"] for h in self.held]
        return [perplexity, kl, held]


def _record(metric: str, method: str, setting: dict, values: list[float], unit: str) -> dict:
    return {
        "metric": metric,
        "method": method,
        "setting": dict(setting),
        "value": statistics.fmean(values),
        "unit": unit,
        "per_window" if metric in ("perplexity", "kl", "bytes") else "per_trial": list(values),
        "mean": statistics.fmean(values),
        "std": _std(values),
        "min": min(values),
        "max": max(values),
    }


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


# model -> {method spec: why it is unavailable, or None}; probing builds a cache and runs a forward
_PROBED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def split_available(methods: list[Method], model, metrics: tuple[str, ...]) -> tuple[list[Method], list[dict]]:
    """The methods that run here, and ``unavailable`` records for the others."""
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique but got {names}")
    available, records = [], []
    for method in methods:
        probed = _PROBED.setdefault(model, {})
        key = repr(method.to_dict())
        if key not in probed:
            probed[key] = unavailable_reason(method, model)
        reason = probed[key]
        if reason is None:
            available.append(method)
        else:
            records.extend(
                {"metric": metric, "method": method.name, "setting": {}, "value": None, "unavailable": reason}
                for metric in metrics
            )
    return available, records
