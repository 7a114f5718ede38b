"""Loading tokenizers and causal LMs by name (alias, local directory, PEFT adapter directory, hub id), and LoRA."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhfkit.data.chat import DEFAULT_CHAT_TEMPLATE
from rlhfkit.errors import ConfigError
from rlhfkit.models.registry import BUNDLED_MODELS, not_found, resolve_model

if TYPE_CHECKING:
    from rlhfkit.config import LoraSettings

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def torch_dtype(name: str) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, float32 elsewhere (CPU matmuls are fastest in float32)."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported() else torch.float32
    return DTYPES[name]


def adapter_base(path: Path) -> str | None:
    """The base model an adapter directory was trained on, or None for a full model directory.

    The base is recorded as a hub id or an absolute directory. Where that directory is gone, two moves are
    followed: a run directory moved with its own `base/` inside (PPO's), and the bundled model's cache moved
    (another machine, another $RLHFKIT_CACHE), which the alias finds again.
    """
    if (path / "config.json").is_file() or not (path / "adapter_config.json").is_file():
        return None
    base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    recorded = Path(base)
    if recorded.is_absolute() and not recorded.exists():
        if (path / recorded.name / "config.json").is_file():
            return str(path / recorded.name)
        if recorded.name in BUNDLED_MODELS:
            return recorded.name
    return base


def is_adapter(name: str) -> bool:
    """Whether `name` is a PEFT adapter directory (rather than full weights or a hub id)."""
    return adapter_base(Path(resolve_model(name))) is not None


def portable_name(name: str) -> str:
    """What an adapter trained on `name` records as its base, for transformers and peft to load from anywhere on
    this machine: a local directory made absolute, the bundled alias's converted directory, or the hub id."""
    if name in BUNDLED_MODELS or Path(name).expanduser().exists():
        return str(Path(resolve_model(name)).resolve())
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer for `name`, with a pad token (EOS where it has none) and a chat template (ChatML where it has none)."""
    resolved = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise not_found(name, e) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        logger.warning("%s has no chat template; using ChatML", name)
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def load_causal_lm(
    name: str, dtype: str = "auto", load_in_4bit: bool = False, trainable_adapter: bool = False
) -> PreTrainedModel:
    """A causal LM by name. A PEFT adapter directory loads its base (by the name stored with it) plus the adapter;
    an adapter whose base is itself an adapter directory gets that one merged in first.

    `load_in_4bit` quantizes the base weights with bitsandbytes (QLoRA); it needs a CUDA GPU.
    """
    resolved = resolve_model(name)
    base_name = adapter_base(Path(resolved))
    if base_name is not None:
        from peft import PeftModel

        base = load_causal_lm(base_name, dtype=dtype, load_in_4bit=load_in_4bit)
        if isinstance(base, PeftModel):  # adapters stack (e.g. PPO on an SFT adapter): fold the lower one in
            base = base.merge_and_unload()
        return PeftModel.from_pretrained(base, resolved, is_trainable=trainable_adapter)

    kwargs: dict = {"dtype": torch_dtype(dtype)}
    if load_in_4bit:
        kwargs["quantization_config"] = _four_bit_config()
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except OSError as e:
        raise not_found(name, e) from e
    # What adapters trained on this model record as their base (peft reads it from here).
    model.name_or_path = model.config.name_or_path = portable_name(name)
    return model


def _four_bit_config():
    if not torch.cuda.is_available():
        raise ConfigError(
            "QLoRA (load_in_4bit: true) needs a CUDA GPU and bitsandbytes, and this machine has no CUDA device. "
            "Set load_in_4bit: false to train LoRA adapters on full-precision weights instead."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("QLoRA needs bitsandbytes: pip install 'rlhfkit[qlora]'") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype("auto"),
    )


def lora_config(settings: LoraSettings, task_type: str | None = None):
    """peft's LoraConfig for rlhfkit's LoRA settings (every trainer's adapters are built from it)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=settings.target_modules, task_type=task_type)


def apply_lora(model: PreTrainedModel, settings: LoraSettings, quantized: bool = False):
    """Wrap `model` with fresh trainable LoRA adapters; the base weights are frozen."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config(settings, task_type="CAUSAL_LM"))


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout probability to 0: reward scores must not depend on dropout noise, and PPO's ratio must
    compare the same function in rollout and update. In the modules (some attention layers keep their rate as a
    float attribute) and in the configs (for modules built later)."""
    names = ("attention_dropout", "hidden_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for key in names:
            if isinstance(getattr(module, key, None), float):
                setattr(module, key, 0.0)
    for module in model.modules():
        config = getattr(module, "config", None)
        for key in names:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)
