"""The nexusquant-cache command: compress a text with a local model folder, inspect the file."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nexusquant_cache import NexusQuantCache, NexusQuantConfig, prefill, prompt_hash
from nexusquant_cache.cli import build_parser, main
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
    assert "prefill 64/365 tokens (18%)" in progress and "prefill 365/365 tokens (100%)" in progress
    cache = NexusQuantCache.load(output)
    expected = NexusQuantConfig.preset("max", recent_window=8, block_size=8)
    assert cache.config == expected and cache.get_seq_length() == 365  # BOS and 364 characters
    ids = [1, *(ord(c) - 30 for c in TEXT)]
    assert cache.prompt == {"sha256": prompt_hash(ids), "length": 365}

    assert main(["inspect", str(output)]) == 0
    report = capsys.readouterr().out
    assert "model_type llama" in report and "num_key_value_heads 2" in report and "head_dim 16" in report
    assert "365 seen" in report and "ratio" in report and f"{output.stat().st_size:,} bytes" in report
    assert main(["inspect", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bytes"] == cache.stats()["bytes"] and report["model"]["num_hidden_layers"] == 3


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
        "--model must be 'smollm2', 'gemma3', a local model folder or a cached model name, but 'llama-7b'"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        main(["compress", "t.txt", "-o", "c.nqc", "--preset", "huge"])


@pytest.mark.real_model
def test_compress_with_smollm2(tmp_path, capsys):
    text = Path(__file__).resolve().parents[2] / "shared" / "data" / "austen" / "emma.txt"
    output = tmp_path / "emma.nqc"
    arguments = ["compress", str(text), "-o", str(output), "--max-tokens", "300", "--chunk-size", "128"]
    assert main([*arguments, "--threads", "2", "--key-bits", "2", "--value-bits", "2"]) == 0
    assert "prefill 300/300 tokens" in capsys.readouterr().err
    assert main(["inspect", str(output)]) == 0
    report = capsys.readouterr().out
    assert "architectures ['LlamaForCausalLM']" in report and "300 seen" in report


def test_demo_compares_the_two_caches(tmp_path, model_folder, capsys):
    text = tmp_path / "book.txt"
    text.write_text(TEXT)
    arguments = ["demo", "--model", str(model_folder), "--text", str(text), "--tokens", "300", "--new-tokens", "6"]
    assert main([*arguments, "--preset", "max"]) == 0
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| DynamicCache") or line.startswith("| NexusQuant")]
    assert len(rows) == 2 and "| 0.50x |" in rows[0] and "| 100% |" in rows[0]  # float32 DynamicCache
    ratio = float(rows[1].split("|")[3].split("x")[0])
    assert ratio > 4  # preset max (K4V2, keep 0.25) on a 300-token prompt, window included


def test_the_demo_text_ships_with_the_austen_data():
    from nexusquant_cache.cli import DEMO_TEXT
    from nexusquant_cache.eval import DEFAULT_TEXT_DIR

    assert (DEFAULT_TEXT_DIR / DEMO_TEXT).is_file()
