"""The evaluation package: methods, bytes, metrics and reports on tiny random models."""

import json
import math

import pytest
import torch
from transformers import DynamicCache

from nexusquant_cache import NexusQuantCache, NexusQuantConfig
from nexusquant_cache.eval import (
    EvalResults,
    Method,
    cache_bytes,
    copy_prompt,
    copy_recall,
    dynamic,
    load_results,
    markdown,
    nexusquant,
    parse_method,
    passkey_prompt,
    peak_memory,
    perplexity_kl,
    quantized,
    run_eval,
    spread_windows,
    tail_logits,
    tensor_bytes,
    unavailable_reason,
)
from nexusquant_cache.eval.quality import split_available

from .tiny_models import tiny_gemma3, tiny_llama

torch.set_num_threads(2)


class CharTokenizer:
    """Characters as tokens, 97 ids as the tiny models have: 0 <bos>, 1 <eos>, 2 newline, 3.. ' '..'}'."""

    bos_token_id, eos_token_id, unk_token_id = 0, 1, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 if c == "\n" else ord(c) - 29 if " " <= c <= "}" else 3 for c in text]}

    def convert_ids_to_tokens(self, ids):
        return ["<bos>" if i == 0 else "<eos>" if i == 1 else "\n" if i == 2 else chr(i + 29) for i in ids]

    def convert_tokens_to_ids(self, token):
        return 0 if token == "<bos>" else None


SENTENCES = [
    "Emma was handsome, clever, and rich.",
    "She had lived nearly twenty-one years in the world.",
    "Sorrow came, a gentle sorrow, but not at all in the shape of any disagreeable consciousness.",
    "Mr. Woodhouse was fond of society in his own way.",
]


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    folder = tmp_path_factory.mktemp("books")
    text = "\n\n".join(" ".join(SENTENCES[(i + j) % 4] for j in range(3)) for i in range(200))
    (folder / "a.txt").write_text(text)
    (folder / "b.txt").write_text(text.upper())
    return folder


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return tiny_llama().eval()


def windows(count=2, length=160, seed=1):
    return torch.randint(3, 97, (count, length), generator=torch.Generator().manual_seed(seed))


# --- methods -----------------------------------------------------------------------------


def test_parse_method_specs():
    assert parse_method("dynamic") == dynamic()
    assert parse_method("nq:preset=max").name == "NQ max"
    assert parse_method("nq:preset=max").config() == NexusQuantConfig.preset("max")
    evict = parse_method("nq:key_bits=16,value_bits=16,keep_ratio=0.5,scorer=h2o")
    assert evict.name == "16-bit keep 0.5 h2o" and evict.config().scorer == "h2o"
    assert parse_method("nq:key_bits=4,value_bits=2@mine").name == "mine"
    assert parse_method("quanto:2") == quantized("quanto", 2)
    assert parse_method("hqq:4,residual_length=32").options == {"backend": "hqq", "nbits": 4, "residual_length": 32}
    assert Method.from_dict(json.loads(json.dumps(evict.to_dict()))) == evict


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nq:key_bits=5", "`key_bits` must be one of"),
        ("nq:keep=0.5", "unknown NexusQuantConfig fields"),
        ("quanto:3", "`nbits` for 'quanto' must be one of"),
        ("gptq:4", "must start with one of"),
        ("nq:key_bits", "expected field=value"),
        ("fp8:4", "takes no"),
    ],
)
def test_bad_method_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_method(spec)


# --- bytes -------------------------------------------------------------------------------


def test_bytes_of_each_kind_of_cache(llama):
    ids = windows(1, 200)
    caches = {
        "dynamic": DynamicCache(config=llama.config),
        "nq": NexusQuantCache(NexusQuantConfig(key_bits=4, value_bits=2, keep_ratio=0.5, recent_window=16), llama),
    }
    for cache in caches.values():
        with torch.no_grad():
            llama(ids, cache=cache)
    config = llama.config
    numbers = 2 * config.num_hidden_layers * config.num_key_value_heads * 200 * (64 // 4)  # keys + values
    dynamic_bytes = cache_bytes(caches["dynamic"])
    assert dynamic_bytes["bytes"] == 2 * numbers  # 16-bit accounting of a float32 model
    assert dynamic_bytes["tensor_bytes"] == 4 * numbers  # what float32 really holds
    ours = cache_bytes(caches["nq"])
    assert ours["check"] and ours["bytes"] == ours["tensor_bytes"] == caches["nq"].stats()["bytes"]["total"]
    assert ours["baseline_bytes"] == dynamic_bytes["bytes"]
    assert ours["bytes"] < dynamic_bytes["bytes"] / 3


def test_tensor_bytes_opens_containers_and_counts_16_bit():
    held = (
        torch.zeros(3, 4),
        {"scale": torch.zeros(5, dtype=torch.float16), "codes": torch.zeros(7, dtype=torch.uint8)},
    )
    assert tensor_bytes(held) == 48 + 10 + 7
    assert tensor_bytes(held, float_bytes=2) == 24 + 10 + 7


def test_quantized_cache_bytes_count_codes_scales_and_residual(llama):
    method = quantized("hqq", 2, residual_length=16, q_group_size=16)
    reason = unavailable_reason(method, llama)
    assert reason is None, f"hqq is installed by the test setup (the `peers` extra) but fails: {reason}"
    cache = method.build(llama)
    with torch.no_grad():
        llama(windows(1, 64), cache=cache)
        llama(windows(1, 8)[:, :8], cache=cache, position_ids=torch.arange(64, 72)[None])
    held = cache_bytes(cache)
    layers = llama.config.num_hidden_layers
    numbers = layers * 2 * 2 * 64 * 16  # layers x (k, v) x heads x tokens x head_dim, all quantized
    codes = numbers // 4  # 2 bits
    groups = numbers // 16  # one float32 scale and zero per 16 numbers
    residual = layers * 2 * 2 * 8 * 16 * 4  # 8 float32 tokens waiting in the residual
    assert held["parts"]["quantized"] == codes + 2 * 4 * groups
    assert held["parts"]["residual"] == residual
    assert held["bytes"] == codes + 8 * groups + residual


# --- perplexity and KL -------------------------------------------------------------------


def by(records, metric, method):
    found = [r for r in records if r["metric"] == metric and r["method"] == method]
    assert len(found) == 1, (metric, method, found)
    return found[0]


def test_dynamic_against_itself_and_16_bit_cache_are_exact(llama):
    records = perplexity_kl(llama, windows(2, 160), ["dynamic", "nq:key_bits=16,value_bits=16"], score=48, chunk=16)
    reference = by(records, "perplexity", "reference")
    for name in ("DynamicCache", "16-bit"):
        assert by(records, "kl", name)["value"] == 0 and by(records, "kl", name)["per_window"] == [0, 0]
        assert by(records, "perplexity", name)["per_window"] == reference["per_window"]
        assert by(records, "perplexity", name)["change"] == 0
    assert by(records, "bytes", "DynamicCache")["ratio"] == 1
    ours = by(records, "bytes", "16-bit")
    assert ours["check"] and ours["baseline_check"]
    # At 16 bits the cache keeps the model's float32 states: half the ratio of a 16-bit model's.
    assert ours["ratio"] == pytest.approx(0.5) and ours["ratio_16bit"] == pytest.approx(1)
    assert reference["value"] > 50  # a random model over 97 tokens: near-uniform predictions


def test_compressed_cache_loses_a_little_and_saves_bytes(llama):
    records = perplexity_kl(llama, windows(2, 160), ["nq:key_bits=2,value_bits=2,recent_window=8,block_size=8"], 48, 16)
    (name,) = {r["method"] for r in records} - {"reference"}
    kl, held = by(records, "kl", name), by(records, "bytes", name)
    assert 0 < kl["value"] < 0.5 and len(kl["per_window"]) == 2 and kl["std"] >= 0
    assert held["ratio"] > 3 and held["check"] and held["baseline_check"]
    assert held["per_window_guarded_layers"] == [[], []]


def test_tail_logits_match_one_full_forward(llama):
    ids = windows(1, 100)
    logits, _, _ = tail_logits(llama, ids[:, :70], ids[0, 70:], DynamicCache(config=llama.config), chunk=8)
    with torch.no_grad():
        full = llama(ids).logits[0, 69:99]
    assert logits.shape == (30, 97)
    torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)


# --- copy recall and pass key ------------------------------------------------------------


def test_copy_prompt_layout_by_hand():
    filler = list(range(100, 140))
    prompt = copy_prompt(filler, [5, 6, 7, 8, 9], depth=0.5, context=20, cue=2)
    # room = 15 filler tokens; the span starts at round(0.5 * 15) = 8
    assert prompt.prefix.tolist() == [[*range(100, 108), 5, 6, 7, 8, 9, *range(108, 115)]]
    assert prompt.tail.tolist() == [5, 6, 7, 8, 9] and prompt.targets == slice(2, 5)
    assert prompt.depth == 8 / 20
    with pytest.raises(ValueError, match="`cue` must be in"):
        copy_prompt(filler, [5, 6], 0.5, 20, cue=2)
    with pytest.raises(ValueError, match="filler tokens"):
        copy_prompt(filler[:5], [5, 6, 7], 0.5, 20, cue=1)


def test_prompts_snap_to_a_sentence_end_and_plant_the_key():
    tokenizer = CharTokenizer()
    filler = tokenizer("x" + " ".join(SENTENCES * 3))["input_ids"]
    prompt = passkey_prompt(tokenizer, filler, "12345", depth=0.5, context=160)
    text = "".join(tokenizer.convert_ids_to_tokens(prompt.prefix[0].tolist()))
    assert len(text) == 160 and text.endswith(" What is the pass key? The pass key is")
    assert ". The pass key is 12345. Remember it." in text  # after a sentence end
    assert "".join(tokenizer.convert_ids_to_tokens(prompt.tail.tolist())) == " 12345"


class Echo(torch.nn.Module):
    """A fake model whose greedy prediction is the token after the previous occurrence of the current
    token in the cache: a perfect copier, with real cache updates (a DynamicCache of one layer)."""

    def __init__(self):
        super().__init__()
        self.config = tiny_llama().config
        self.config.num_hidden_layers = 1
        self.device = torch.device("cpu")

    def forward(self, ids, cache, position_ids=None, logits_to_keep=0):
        before = cache.get_seq_length()
        keys = torch.nn.functional.one_hot(ids, 97).float()[:, None]  # [1, 1, q, 97]
        stored, _ = cache.update(keys, keys, 0)
        seen = stored[0, 0].argmax(-1)  # [T]: every token so far
        length = seen.shape[0]
        now = seen[before:]
        # For each new token, the token after its latest earlier occurrence (else 0).
        same = (seen[None, :-1] == now[:, None]) & (
            torch.arange(length - 1)[None] < torch.arange(before, length)[:, None]
        )
        last = torch.where(same, torch.arange(length - 1), -1).amax(-1)
        logits = torch.nn.functional.one_hot(torch.where(last >= 0, seen[last + 1], 0), 97).float()[None]
        return type("Out", (), {"logits": logits[:, -logits_to_keep:] if logits_to_keep else logits})


def test_copy_recall_of_a_perfect_copier_and_of_a_tiny_model(book, llama):
    tokenizer = CharTokenizer()
    texts = [("a", (book / "a.txt").read_text())]
    echo = copy_recall(Echo(), tokenizer, ["dynamic"], texts, context=300, depths=(0.5,), spans=(24,), cue=4)
    # Random words repeat letters, so copying from the latest occurrence of a character is not
    # always right; the score is exactly the fraction the copier's rule gets right, computed here.
    filler = spread_windows(tokenizer, texts, 1, 300, 0, phase=0.25)[0]
    from nexusquant_cache.eval.data import random_span

    span = random_span(tokenizer, 24, 24)
    prompt = copy_prompt(filler, span, 0.5, 300, 4, tokenizer)
    sequence = prompt.prefix[0].tolist() + span
    expected = []
    for i in range(300 + 4, 300 + 24):  # the token after the latest earlier occurrence of sequence[i - 1]
        previous = max(j for j in range(i - 1) if sequence[j] == sequence[i - 1])
        expected.append(sequence[previous + 1] == sequence[i])
    assert echo[0]["value"] == pytest.approx(sum(expected) / len(expected))
    assert echo[0]["per_trial"] == [echo[0]["value"]] and echo[0]["setting"]["span"] == 24

    tiny = copy_recall(llama, tokenizer, ["dynamic"], texts, context=300, depths=(0.5,), spans=(24,), cue=4)
    with torch.no_grad():
        greedy = llama(torch.tensor([sequence[:-1]])).logits[0, 300 + 3 :].argmax(-1)
    assert tiny[0]["value"] == pytest.approx((greedy == torch.tensor(span[4:])).float().mean().item())


# --- unavailable peers -------------------------------------------------------------------


def test_unavailable_peer_is_reported_cleanly(book):
    gemma = tiny_gemma3().eval()  # QuantizedCache refuses sliding-window layers
    records = perplexity_kl(
        gemma, windows(1, 96), ["quanto:4", "nq:key_bits=2,value_bits=2,recent_window=8,block_size=8"], 32, 16
    )
    missing = [r for r in records if r["method"] == "quanto int4"]
    assert {r["metric"] for r in missing} == {"perplexity", "kl", "bytes"}
    assert all(r["value"] is None and "ValueError" in r["unavailable"] for r in missing)
    assert by(records, "kl", "NQ K2V2 recent_window=8 block_size=8")["value"] > 0
    table = markdown([{**r, "model": "tiny"} for r in records])
    assert "| quanto int4 | unavailable: ValueError" in table


def test_missing_backend_is_reported_with_its_error(monkeypatch):
    import transformers.cache_utils as cache_utils

    monkeypatch.setattr(cache_utils, "is_hqq_available", lambda: False)
    available, records = split_available([quantized("hqq", 2)], tiny_llama(), ("passkey",))
    assert available == [] and records[0]["unavailable"].startswith("ImportError: You need to install `HQQ`")


# --- the whole run and its files ---------------------------------------------------------


def test_run_eval_writes_json_markdown_and_plots(book, llama, tmp_path):
    results = run_eval(
        llama,
        CharTokenizer(),
        ["nq:key_bits=4,value_bits=2,keep_ratio=0.5,recent_window=8,block_size=8@ours", "quanto:2"],
        text=book,
        metrics=["perplexity", "copy_recall", "passkey", "speed"],
        windows=2,
        context=192,
        score=32,
        chunk=16,
        copy_depths=(0.5,),
        copy_spans=(16,),
        passkey_depths=(0.5,),
        passkey_trials=1,
        decode_tokens=4,
        output_dir=tmp_path,
        progress=False,
    )
    names = {r["method"] for r in results.records}
    assert {"DynamicCache", "ours", "quanto int2"} <= names  # dynamic added first
    speed = by(results.records, "decode_tokens_per_s", "DynamicCache")
    assert speed["value"] > 0 and speed["vs_dynamic"] == 1
    assert by(results.records, "compression_time", "ours")["value"] > 0
    assert all(r["model"] == "llama" for r in results.records)
    meta, records = load_results(tmp_path / "results.json")
    assert records == json.loads(json.dumps(results.records)) and meta["windows"] == 2
    assert EvalResults.load(tmp_path).markdown() == (tmp_path / "results.md").read_text()
    table = results.markdown()
    assert "| DynamicCache | 1.00x |" in table and "Copy recall" in table and "Pass key" in table
    assert (tmp_path / "quality_vs_ratio_llama.png").stat().st_size > 1000


def test_bad_inputs_say_what_is_wrong(llama, book):
    with pytest.raises(ValueError, match="unknown metrics"):
        run_eval(llama, CharTokenizer(), ["dynamic"], text=book, metrics=["bleu"])
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        run_eval(llama, CharTokenizer(), ["dynamic"], text=book / "missing.txt")
    with pytest.raises(ValueError, match="0 < score < length"):
        perplexity_kl(llama, windows(1, 32), ["dynamic"], score=32)
    with pytest.raises(ValueError, match="method names must be unique"):
        perplexity_kl(llama, windows(1, 32), ["dynamic", "dynamic"], score=8)
    with pytest.raises(ValueError, match="not an evaluation result file"):
        (book / "x.json").write_text("{}")
        load_results(book / "x.json")


def test_nexusquant_helper_names_and_validates():
    assert (
        nexusquant(key_bits=4, value_bits=2, keep_ratio=0.25, scorer="streaming").name == "NQ K4V2 keep 0.25 streaming"
    )
    assert nexusquant(preset="balanced").name == "NQ balanced"
    assert nexusquant(key_bits=4, value_bits=2, target_ratio=8).name == "NQ K4V2 target 8x snapkv"
    assert math.isclose(nexusquant(preset="max", keep_ratio=0.5).config().keep_ratio, 0.5)
    with pytest.raises(ValueError, match="`preset` must be one of"):
        nexusquant(preset="tiny")


def test_peak_memory_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path / "tiny")
    records = peak_memory(
        str(tmp_path / "tiny"),
        windows(1, 64),
        ["dynamic", "nq:key_bits=4,value_bits=2,recent_window=8,block_size=8@ours"],
        decode_tokens=2,
    )
    first, second = records
    assert first["value"] > 0 and first["how"] in ("VmHWM reset", "ru_maxrss (includes loading the model)")
    assert first["vs_dynamic"] == 1 and second["value"] > 0 and "model_rss" in first and second["method"] == "ours"
    # layers x (keys, values) x KV heads x (64 prompt + 2 decoded tokens) x head_dim x float32
    assert first["held"] == 3 * 2 * 2 * 66 * 16 * 4
    assert 0 < second["held"] < first["held"] and first["prefill_s"] > 0 and second["prefill_s"] > 0


@pytest.mark.real_model
def test_smollm2_small_run(tmp_path):
    from nexusquant_cache.models import load_model

    model, tokenizer = load_model("smollm2")
    results = run_eval(
        model,
        tokenizer,
        ["dynamic", "nq:preset=max"],
        metrics=["perplexity", "passkey"],
        windows=1,
        context=256,
        score=32,
        passkey_depths=(0.5,),
        passkey_trials=1,
        progress=False,
    )
    records = results.records
    assert by(records, "kl", "DynamicCache")["value"] == 0
    held, kl = by(records, "bytes", "NQ max"), by(records, "kl", "NQ max")
    assert held["check"] and held["baseline_check"] and held["ratio"] > 2 and kl["value"] > 0
    assert 5 < by(records, "perplexity", "reference")["value"] < 200
    assert by(records, "passkey", "DynamicCache")["value"] in (0.0, 1.0)


def test_an_interrupted_run_keeps_the_metrics_that_finished(book, llama, tmp_path, monkeypatch):
    import nexusquant_cache.eval.runner as runner

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "copy_recall", interrupted)
    arguments = dict(text=book, windows=1, context=64, score=8, chunk=8, output_dir=tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_eval(llama, CharTokenizer(), ["dynamic"], metrics=["perplexity", "copy_recall"], **arguments)
    meta, records = load_results(tmp_path / "results.json")
    assert meta["complete"] is False and {r["metric"] for r in records} >= {"perplexity", "kl", "bytes"}
    report = (tmp_path / "results.md").read_text()
    assert report.startswith("**Incomplete run**: only perplexity, kl, bytes finished.")
    assert "| DynamicCache |" in report
    assert not list(tmp_path.glob("*.png"))  # plots come with the complete run


def test_builtin_texts_are_prose_and_code_every_python_has():
    from nexusquant_cache.eval import builtin_texts, read_texts

    [(name, prose)] = read_texts(None)
    assert name == "python-docs" and 'The "assert" statement' in prose and len(prose) > 300_000
    code = dict(read_texts("python-code"))
    assert {"argparse.py", "typing.py"} <= set(code) and all(len(text) >= 60_000 for text in code.values())
    assert "def " in code["argparse.py"] and read_texts("python-code") == builtin_texts("python-code")
    with pytest.raises(ValueError, match=r"allowed: \['python-docs', 'python-code'\]"):
        builtin_texts("austen")
