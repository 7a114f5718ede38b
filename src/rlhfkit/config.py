"""Typed configurations (pydantic), read from YAML with `key=value` overrides (dotted keys reach nested fields)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhfkit.errors import ConfigError
from rlhfkit.models.registry import DEFAULT_MODEL


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


class LoraSettings(Strict):
    enabled: bool = True
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class PreviewSettings(Strict):
    """Answers of the model before and after training to a few held-out prompts, printed and saved."""

    num_prompts: int = Field(3, ge=0)
    max_new_tokens: int = Field(64, gt=0)


class SFTConfig(Strict):
    model: str = DEFAULT_MODEL
    train_file: Path
    eval_file: Path | None = None
    output_dir: Path
    overwrite: bool = False  # replace an existing output_dir
    resume_from: Path | Literal["latest"] | None = None  # a checkpoint-N directory, or the newest in output_dir

    system_prompt: str | None = None
    max_length: int = Field(512, gt=0)

    lora: LoraSettings = LoraSettings()
    load_in_4bit: bool = False  # QLoRA: 4-bit base weights (CUDA + bitsandbytes)
    merge_adapter: bool = False  # save merged full weights instead of the adapter

    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs
    batch_size: int = Field(8, gt=0)  # per process, per micro-step
    eval_batch_size: int = Field(16, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where the GPU supports it
    gradient_checkpointing: bool = False
    seed: int = 42

    log_every: int = Field(5, gt=0)
    eval_every: int | None = Field(None, gt=0)  # optimizer steps; None: at the end of each epoch
    save_every: int | None = Field(None, gt=0)  # optimizer steps; None: at the end of each epoch
    save_total_limit: int | None = Field(2, gt=0)  # checkpoints kept; None keeps all

    preview: PreviewSettings = PreviewSettings()

    @model_validator(mode="after")
    def _check(self) -> SFTConfig:
        if self.load_in_4bit and not self.lora.enabled:
            raise ValueError("load_in_4bit (QLoRA) trains LoRA adapters: set lora.enabled: true")
        if self.merge_adapter and not self.lora.enabled:
            raise ValueError("merge_adapter needs lora.enabled: true")
        return self


C = TypeVar("C", bound=BaseModel)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["lora.r=8", "epochs=1"]` -> `{"lora": {"r": 8}, "epochs": 1}`; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. epochs=1 or lora.r=8)")
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[leaf] = yaml.safe_load(value) if value else None
    return tree


def merge_settings(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


def load_config(cls: type[C], path: str | os.PathLike | None, overrides: list[str] = (),
                settings: dict[str, Any] | None = None) -> C:
    """Build `cls` from a YAML file (optional), then `settings` (a command's own options), then `key=value`
    overrides; errors name the file and the bad key."""
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    raw = merge_settings(merge_settings(raw, settings or {}), parse_overrides(list(overrides)))
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown setting (the settings are: {', '.join(_field_names(cls, err['loc'][:-1]))})"
            problems.append(f"  {key}: {msg}")
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from None


def _field_names(cls: type[BaseModel], loc: tuple) -> list[str]:
    model: Any = cls
    for part in loc:
        annotation = model.model_fields[part].annotation
        model = annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def dump_config(config: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved configuration (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


class RewardConfig(Strict):
    """Reward-model training from rankings (consolidated by majority) or pairs; Bradley-Terry loss."""

    model: str = DEFAULT_MODEL  # backbone: alias, directory (e.g. an SFT run), or hub id
    train_file: Path  # rankings or pairs JSONL (detected from the keys)
    eval_file: Path | None = None
    output_dir: Path
    overwrite: bool = False

    keep_ties: bool = False  # ties as pairs with label 1/2
    max_length: int = Field(384, gt=0)
    lora: LoraSettings = LoraSettings(enabled=False)

    epochs: float = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)  # prompts per process per step; all of a prompt's completions go through at once
    eval_batch_size: int = Field(16, gt=0)  # sequences
    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 42
    log_every: int = Field(5, gt=0)


class SamplingConfig(Strict):
    """How the policy samples responses. Log-probabilities, ratios and KL are computed under exactly this
    distribution: with top_p < 1 or top_k > 0, the truncated and renormalised one (see rlhfkit.rollout)."""

    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off


class RewardTerm(Strict):
    """One reward in the weighted sum PPO maximises.

    `scorer`: `toxicity` (offline P(toxic); give it a negative weight), a reward-model directory, or
    `hf:MODEL:LABEL` (a sequence classifier's label probability).
    """

    scorer: str
    weight: float = 1.0
    name: str | None = None  # in the metrics; default: the scorer's own name


class PPOConfig(Strict):
    """PPO with a KL penalty against the frozen starting model. Defaults follow Ziegler et al. 2019 / TRL."""

    model: str  # the starting policy (usually an SFT run directory); also the KL reference
    prompts_file: Path  # JSONL with a "prompt" key per line
    eval_prompts_file: Path | None = None  # held-out prompts for the before/after preview
    output_dir: Path
    overwrite: bool = False
    resume_from: Path | Literal["latest"] | None = None

    system_prompt: str | None = None
    max_prompt_length: int = Field(256, gt=0)  # tokens; longer prompts keep their end
    sampling: SamplingConfig = SamplingConfig()

    rewards: list[RewardTerm] = Field(min_length=1)
    missing_eos_penalty: float | None = Field(1.0, ge=0)  # subtracted from the score of a response that never stops
    reward_clip: float | None = Field(None, gt=0)  # clip the (normalised) score to [-c, c]
    normalize_reward: bool = False  # divide scores by a running std (and subtract the running mean)

    lora: LoraSettings = LoraSettings(dropout=0.0)
    load_in_4bit: bool = False
    merge_adapter: bool = False  # save merged full weights instead of the adapter
    critic: Literal["separate", "value_head"] = "separate"  # own network, or a head on the policy's backbone
    critic_init: Literal["auto", "reward_model", "policy"] = "auto"  # separate critic: auto = reward model if compatible

    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_coef: float = Field(0.05, ge=0)  # beta; the starting value under the adaptive controller
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = Field(6.0, gt=0)  # adaptive: KL per sequence (nats) to aim for
    kl_horizon: int = Field(10000, gt=0)  # adaptive: episodes over which beta adjusts

    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    target_approx_kl: float | None = Field(None, gt=0)  # stop an epoch's updates once approx-KL passes this
    # pi_old is recorded by the sampler; True recomputes it with a forward pass (the sampler's figures are then
    # only compared with it: `rollout/logprob_gap_*`)
    recompute_logprobs: bool = False

    steps: int = Field(100, gt=0)  # PPO iterations: rollout a batch, then update
    batch_size: int = Field(16, gt=0)  # rollouts per iteration, per process
    mini_batch_size: int = Field(4, gt=0)  # rollouts per optimizer step, per process
    micro_batch_size: int | None = Field(None, gt=0)  # rollouts per forward (gradient accumulation); None: mini_batch_size
    ppo_epochs: int = Field(4, gt=0)
    learning_rate: float = Field(1e-5, gt=0)
    critic_learning_rate: float | None = Field(None, gt=0)  # None: learning_rate
    weight_decay: float = Field(0.0, ge=0)
    adam_eps: float = Field(1e-5, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    max_nonfinite_updates: int = Field(3, ge=0)  # skipped NaN/Inf updates tolerated before the run stops
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    seed: int = 42

    log_every: int = Field(1, gt=0)
    save_every: int | None = Field(None, gt=0)  # iterations; None: only at the end
    save_total_limit: int | None = Field(2, gt=0)
    preview: PreviewSettings = PreviewSettings()

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        micro = self.micro_batch_size or self.mini_batch_size
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % micro:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size ({micro})")
        if self.load_in_4bit and not self.lora.enabled:
            raise ValueError("load_in_4bit (QLoRA) trains LoRA adapters: set lora.enabled: true")
        if self.merge_adapter and not self.lora.enabled:
            raise ValueError("merge_adapter needs lora.enabled: true")
        return self


class EvalConfig(Strict):
    """Sampled answers of several models to one prompt set, scored and compared (`rlhfkit eval`)."""

    models: dict[str, str] = Field(min_length=1)  # name -> model (alias, directory, hub id); the first is the baseline
    prompts: str  # a JSONL file with a "prompt" key per line, or a Hugging Face dataset id (needs `datasets`)
    prompt_field: str = "prompt"  # dataset column; a dict value uses its "text" (allenai/real-toxicity-prompts)
    dataset_split: str = "train"
    limit: int | None = Field(None, gt=0)  # the first N prompts
    output_dir: Path
    overwrite: bool = False

    reference: str | None = None  # name in `models` for KL, perplexity and win rate; default: the first
    toxicity: str = "toxicity"  # offline scorer, or hf:MODEL:LABEL with LABEL the toxic class
    reward_model: str | None = None  # reward-model directory: mean score and win rate against the reference
    # Gold measures, where the prompt records carry an ideal `response` and `facts` (rlhfkit.evaluation.gold):
    embedding_model: str = "all-minilm-l6-v2"  # sentence embedder for the similarity to the ideal answer
    facts_sheet: Path | None = None  # the knowledge source: made-up contacts and its own statements are checked

    system_prompt: str | None = None
    max_prompt_length: int = Field(256, gt=0)
    sampling: SamplingConfig = SamplingConfig()  # as PPO samples, so that KL here is PPO's kl/ref
    batch_size: int = Field(16, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    seed: int = 0
    bootstrap_samples: int = Field(10_000, gt=0)
    confidence: float = Field(0.95, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        if self.reference is not None and self.reference not in self.models:
            raise ValueError(f"reference {self.reference!r} is not one of the models ({', '.join(self.models)})")
        return self


class SimulateConfig(Strict):
    """Simulated annotators (`rlhfkit simulate`): rankings of K completions by a gold utility plus noise.

    Each annotator ranks by u_i + noise * g_i with g_i standard Gumbel draws: a Plackett-Luce ranking with weights
    exp(u_i / noise), the K-way form of Bradley-Terry (noise 0: every annotator follows the gold utility exactly).
    """

    gold: list[RewardTerm] = Field(min_length=1)  # the gold utility: a weighted sum, as PPO's rewards
    completions_file: Path | None = None  # {"prompt", "completions": [...]} per line; or sample from `model`
    model: str | None = None
    prompts_file: Path | None = None
    k: int = Field(4, ge=2)  # completions per prompt when sampling
    limit: int | None = Field(None, gt=0)
    system_prompt: str | None = None
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, gt=0)

    annotators: int = Field(3, ge=1)
    noise: float = Field(0.1, ge=0)  # Gumbel scale, in units of the gold utility
    output_file: Path
    overwrite: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SimulateConfig:
        sampling = (self.model is not None, self.prompts_file is not None)
        if (self.completions_file is not None) == any(sampling) or (any(sampling) and not all(sampling)):
            raise ValueError("give either completions_file, or model and prompts_file to sample k completions per prompt")
        return self
