"""Several adapters on one 4-bit base, switched per request, and adapters made for another base."""

import pytest
import torch

from qlorakit.config import LoraConfig
from qlorakit.errors import ConfigError, StateDictError
from qlorakit.generate import AdapterSpec, generate_ids, load_adapters, use_adapter
from qlorakit.lora import add_lora, lora_layers, save_adapter
from tests.helpers.tiny_llama import tiny_llama_config

PROMPT = list(b"The adapter says")
BASE_NAMES = ["/models/tiny-llama"]


def _save_random_adapter(model, directory, seed, targets="all-linear", base_name="tiny-llama"):
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, targets=targets), name="tmp")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B["tmp"].weight.copy_(torch.randn(layer.lora_B["tmp"].weight.shape, generator=generator))
    return save_adapter(model, directory, name="tmp", base_model_name_or_path=base_name)


@pytest.fixture
def two_adapters(tiny_model, tmp_path):
    x = _save_random_adapter(tiny_model(), tmp_path / "x", seed=1)
    y = _save_random_adapter(tiny_model(), tmp_path / "y", seed=2, targets=("q_proj", "v_proj"))
    return [AdapterSpec("x", x), AdapterSpec("y", y)]


def test_adapter_x_among_several_equals_a_model_with_x_alone(tiny_model, two_adapters):
    shared = tiny_model()
    assert load_adapters(shared, two_adapters, BASE_NAMES) == ["x", "y"]
    alone = tiny_model()
    load_adapters(alone, two_adapters[:1], BASE_NAMES)
    outputs = {}
    for name in ("x", "y", "base"):
        use_adapter(shared, name)
        outputs[name] = list(generate_ids(shared, PROMPT, 10))
    assert outputs["x"] == list(generate_ids(alone, PROMPT, 10))
    use_adapter(alone, None)
    assert outputs["base"] == list(generate_ids(alone, PROMPT, 10)) == list(generate_ids(tiny_model(), PROMPT, 10))
    assert len({tuple(v) for v in outputs.values()}) == 3  # the adapters change the output


def test_adapter_spec_names_it_after_the_directory():
    named = AdapterSpec.parse("a=runs/sql-adapter/")
    assert AdapterSpec.parse("runs/sql-adapter/") == AdapterSpec("sql-adapter", named.path)
    assert AdapterSpec.parse("a=b").name == "a"
    with pytest.raises(ConfigError, match="reserved"):
        AdapterSpec.parse("base=somewhere")


def test_unknown_adapter_name_lists_the_loaded_ones(tiny_model, two_adapters):
    model = tiny_model()
    load_adapters(model, two_adapters, BASE_NAMES)
    with pytest.raises(ConfigError, match=r"no adapter named 'z'.*\['x', 'y'\]"):
        use_adapter(model, "z")


def test_adapter_with_other_shapes_fails_before_the_model_changes(tiny_model, tmp_path):
    import transformers

    from qlorakit.models import quantize_model

    wider = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=260, hidden_size=32)).eval()
    quantize_model(wider)
    spec = AdapterSpec("w", _save_random_adapter(wider, tmp_path / "w", seed=3))
    model = tiny_model()
    with pytest.raises(StateDictError, match="has shape .* another base model"):
        load_adapters(model, [spec], BASE_NAMES)
    assert lora_layers(model) == {}


def test_adapter_whose_layers_are_absent_fails(tiny_model, tmp_path):
    import transformers

    from qlorakit.models import quantize_model

    deeper = transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=260, num_hidden_layers=3)).eval()
    quantize_model(deeper)
    spec = AdapterSpec("d", _save_random_adapter(deeper, tmp_path / "d", seed=4))
    with pytest.raises(StateDictError, match="model.layers.2.* does not exist in this model"):
        load_adapters(tiny_model(), [spec], BASE_NAMES)


def test_adapter_declared_for_another_base_name_fails_unless_allowed(tiny_model, tmp_path):
    path = _save_random_adapter(tiny_model(), tmp_path / "o", seed=5, base_name="meta-llama/Llama-2-7b-hf")
    with pytest.raises(StateDictError, match="Llama-2-7b-hf.*another base model.*--allow-other-base"):
        load_adapters(tiny_model(), [AdapterSpec("o", path)], BASE_NAMES)
    assert load_adapters(tiny_model(), [AdapterSpec("o", path)], BASE_NAMES, allow_other_base=True) == ["o"]


def test_base_names_match_across_paths_hub_ids_and_gguf_files(tiny_model, tmp_path):
    path = _save_random_adapter(tiny_model(), tmp_path / "s", seed=6, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    names = ["/data/models/SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert load_adapters(tiny_model(), [AdapterSpec("s", path)], names) == ["s"]
