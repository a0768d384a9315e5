"""cache_implementation="nexusquant": the registration transformers needs, on the installed release."""

import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, GenerationMixin

import nexusquant_cache
from nexusquant_cache import NexusQuantCache
from nexusquant_cache.integration import accept_cache_implementation, build_cache_for_its_name
from tests.tiny_models import greedy, prompt, tiny_llama


def generate(model, **kwargs):
    out = greedy(model, prompt(), max_new_tokens=6, **kwargs)
    return out.sequences, out.cache


@pytest.fixture
def model():
    torch.manual_seed(0)
    return tiny_llama().eval()


def test_cache_implementation_builds_the_configured_cache(model):
    tokens, cache = generate(model, cache_implementation="nexusquant", cache_config={"key_bits": 16, "value_bits": 16})
    expected, _ = generate(model)
    assert isinstance(cache, NexusQuantCache) and cache.config.key_bits == 16
    assert torch.equal(tokens, expected)  # 16-bit: the same tokens as DynamicCache


def test_cache_config_may_be_a_config_object(model):
    config = nexusquant_cache.NexusQuantConfig(key_bits=16, value_bits=16)
    tokens, cache = generate(model, cache_implementation="nexusquant", cache_config=config)
    assert isinstance(cache, NexusQuantCache) and cache.config == config
    assert torch.equal(tokens, generate(model)[0])


def test_cache_config_may_name_a_preset(model):
    _, cache = generate(model, cache_implementation="nexusquant", cache_config={"preset": "max", "keep_ratio": 0.5})
    assert cache.config == nexusquant_cache.NexusQuantConfig.preset("max", keep_ratio=0.5)
    with pytest.raises(ValueError, match="`preset` must be one of"):
        generate(model, cache_implementation="nexusquant", cache_config={"preset": "tiny"})


def test_generation_config_route_and_json_round_trip(model, tmp_path):
    model.generation_config.cache_implementation = "nexusquant"
    model.generation_config.cache_config = {"key_bits": 2, "keep_ratio": 0.5, "recent_window": 8, "block_size": 4}
    model.generation_config.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert loaded.cache_implementation == "nexusquant"
    _, cache = generate(model)
    assert isinstance(cache, NexusQuantCache) and cache.config.key_bits == 2 and cache.config.keep_ratio == 0.5


def test_other_cache_implementations_are_untouched(model):
    _, cache = generate(model)
    assert type(cache) is DynamicCache
    with pytest.raises(ValueError, match="Passing both `cache_implementation`"):
        generate(model, cache_implementation="nexusquant", cache=DynamicCache())


def test_bad_cache_config_names_the_field(model):
    with pytest.raises(ValueError, match="`key_bits` must be one of"):
        generate(model, cache_implementation="nexusquant", cache_config={"key_bits": 5})


def test_registration_is_idempotent():
    from transformers.generation import configuration_utils
    from transformers.generation import utils as generation_utils

    wrapped = GenerationMixin._prepare_cache_for_generation
    accept_cache_implementation(configuration_utils)
    build_cache_for_its_name(generation_utils)
    assert GenerationMixin._prepare_cache_for_generation is wrapped and wrapped._nexusquant

    assert configuration_utils.ALL_CACHE_IMPLEMENTATIONS.count("nexusquant") == 1
    assert nexusquant_cache.NexusQuantCache is NexusQuantCache


def run_fresh(code: str) -> str:
    """``code`` in a new interpreter (what it imports is the point); its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_name_is_registered_whichever_is_imported_first():
    generate = (
        "import torch; from tests.tiny_models import greedy, prompt, tiny_llama; "
        "out = greedy(tiny_llama().eval(), prompt(), max_new_tokens=2, cache_implementation='nexusquant'); "
        "print(type(out.cache).__name__)"
    )
    # nexusquant_cache first: it loads neither torch nor transformers, and registers once transformers loads.
    first = "import sys, nexusquant_cache; print('torch' in sys.modules, 'transformers' in sys.modules); "
    assert run_fresh(first + generate).split() == ["False", "False", "NexusQuantCache"]
    for before in ("transformers", "transformers.generation.utils", "nexusquant_cache.layer", "nexusquant_cache.eval"):
        code = f"import {before}, nexusquant_cache; " + generate
        assert run_fresh(code).split() == ["NexusQuantCache"], before
    # submodules stay attributes of the package, as with an eager import
    assert run_fresh("import nexusquant_cache; print(nexusquant_cache.io.FORMAT_VERSION)").split() == ["5"]


def test_the_command_line_starts_without_torch():
    code = (
        "import contextlib, io, sys\nfrom nexusquant_cache.cli import main\n"
        "for argv in (['--help'], ['compress', '--help'], ['demo', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(name for name in ('torch', 'transformers') if name in sys.modules))"
    )
    assert run_fresh(code).strip() == "[]"
