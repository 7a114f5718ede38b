"""Model names and aliases (the bundled model), loading and caching, LoRA; the policy and critic networks and the
starting model policy trainers begin from (`rlhfkit.models.policy`)."""

from rlhfkit.models.loading import apply_lora, load_causal_lm, load_tokenizer, torch_dtype
from rlhfkit.models.registry import BUNDLED_MODELS, DEFAULT_MODEL, resolve_model

__all__ = [
    "BUNDLED_MODELS",
    "DEFAULT_MODEL",
    "apply_lora",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_model",
    "torch_dtype",
]
