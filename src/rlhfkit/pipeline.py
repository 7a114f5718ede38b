"""`rlhfkit pipeline run CONFIG`: the stages wired together, each into its own directory under `output_dir`.

  sft_ungrounded  SFT without the pipeline's retrieval (the ungrounded model to compare with) -> OUT/sft_ungrounded
  sft     supervised fine-tuning of the base model            -> OUT/sft
  feedback  K answers per prompt sampled from a policy, ranked by simulated annotators (`rlhfkit simulate`)
          -> OUT/feedback/rankings.jsonl, and the answers for the feedback app in OUT/feedback/completions.jsonl
  reward  reward model from human rankings                     -> OUT/reward
  ppo     PPO against the rewards, KL to the starting model    -> OUT/ppo
  rloo    RLOO, the same trainer (`rlhfkit rloo`)              -> OUT/rloo
  grpo    GRPO, the same trainer (`rlhfkit grpo`)              -> OUT/grpo
  dpo     DPO straight from the rankings' pairs (`rlhfkit dpo`)  -> OUT/dpo
  eval    the models side by side on held-out prompts           -> OUT/eval
  report  one HTML page of all of it                            -> OUT/report.html

A stage's settings are those of its own command (`rlhfkit sft`, ...) without `output_dir`; string settings may
name other stages' outputs as `{base}` (the pipeline's `model`), `{sft_ungrounded}`, `{sft}`, `{feedback}`, `{reward}`, `{ppo}`,
`{rloo}`, `{grpo}` and `{dpo}`. A top-level `retrieval:` block (rlhfkit.config.RetrievalSettings) grounds the
prompts of every stage that renders them (all but sft_ungrounded; dpo does not ground yet and is refused beside
it); a stage's own `retrieval:` (null: none) overrides it. The ppo, rloo and grpo stages take the settings
of their commands (`rlhfkit ppo`, `rlhfkit rloo`, `rlhfkit grpo`: one config), each with its own algorithm fixed.
A stage that is left out (or null) is skipped, and nothing may refer to it.

A finished stage leaves `pipeline_stage.json` (its settings and how long it took): a rerun skips it. A stage
interrupted midway resumes from its last checkpoint (SFT, reward, PPO, RLOO, GRPO, DPO) or starts again (eval: no checkpoints).
Changing a finished stage's settings is an error that names the changed keys, unless `--restart-from STAGE`
says to run that stage and every later one again.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from rlhfkit.config import (
    DPOConfig,
    EvalConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    SimulateConfig,
    Strict,
    load_config,
    merge_settings,
    parse_overrides,
)
from rlhfkit.errors import ConfigError
from rlhfkit.models.registry import DEFAULT_MODEL

logger = logging.getLogger(__name__)

STAGES: dict[str, type[BaseModel]] = {"sft_ungrounded": SFTConfig, "sft": SFTConfig, "feedback": SimulateConfig,
                                       "reward": RewardConfig,
                                       "ppo": PPOConfig, "rloo": PPOConfig, "grpo": PPOConfig, "dpo": DPOConfig,
                                       "eval": EvalConfig}
ONLINE = ("ppo", "rloo", "grpo")  # the online trainer's stages; the name is the algorithm
UNGROUNDED = "sft_ungrounded"  # the stage the pipeline's retrieval block leaves out
DONE_FILE = "pipeline_stage.json"
RUN_SETTINGS = ("output_dir", "overwrite", "resume_from")  # how a stage is run, not what it computes
# the stages that write files, not a directory: their files in output_dir/<stage>
OUTPUT_FILES = {"feedback": {"output_file": "rankings.jsonl", "items_file": "completions.jsonl"}}
PLACEHOLDER = re.compile(r"\{(\w+)\}")


class PipelineConfig(Strict):
    model: str = DEFAULT_MODEL  # the base model, `{base}` in the stages' settings
    output_dir: Path
    retrieval: dict[str, Any] | None = None  # grounds every stage's prompts but sft_ungrounded's (see the docstring)
    sft_ungrounded: dict[str, Any] | None = None
    sft: dict[str, Any] | None = None
    feedback: dict[str, Any] | None = None
    reward: dict[str, Any] | None = None
    ppo: dict[str, Any] | None = None
    rloo: dict[str, Any] | None = None
    grpo: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    quick: list[str] = Field(default_factory=list)  # key=value overrides for `--quick` (e.g. ppo.steps=2)


@dataclass
class StageRun:
    name: str
    output_dir: Path
    status: str  # "ran", "resumed" or "skipped" (finished before)
    seconds: float  # this stage's own run time, including when it finished in an earlier invocation


@dataclass
class PipelineResult:
    output_dir: Path
    stages: list[StageRun] = field(default_factory=list)
    report: Path | None = None
    evaluation: dict[str, Any] | None = None  # eval.json, when there is an eval stage


def _substitute(value: Any, names: dict[str, str], stage: str) -> Any:
    if isinstance(value, str):
        def replace(m: re.Match) -> str:
            if m.group(1) not in names:
                known = ", ".join("{" + n + "}" for n in names)
                raise ConfigError(f"{stage}: {m.group(0)} names no stage of this pipeline (known here: {known})")
            return names[m.group(1)]
        return PLACEHOLDER.sub(replace, value)
    if isinstance(value, dict):
        return {k: _substitute(v, names, stage) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, names, stage) for v in value]
    return value


def load_pipeline_config(path, overrides: list[str] = (), quick: bool = False) -> PipelineConfig:
    """The YAML config, then its `quick:` overrides (with `quick`), then the command line's overrides."""
    cfg = load_config(PipelineConfig, path)
    if not quick:
        return load_config(PipelineConfig, path, overrides)
    if not cfg.quick:
        raise ConfigError(f"{path} has no `quick:` overrides")
    return load_config(PipelineConfig, None, list(overrides),
                       settings=merge_settings(cfg.model_dump(mode="json"), parse_overrides(cfg.quick)))


def stage_configs(cfg: PipelineConfig) -> dict[str, BaseModel]:
    """Every present stage's validated config, in order; placeholders resolve to earlier stages' directories.

    All are built before anything runs, so a mistake in the eval settings fails in a second, not after PPO."""
    names = {"base": cfg.model}
    configs = {}
    for stage, cls in STAGES.items():
        settings = getattr(cfg, stage)
        if settings is None:
            continue
        outputs = {k: cfg.output_dir / stage / name for k, name in OUTPUT_FILES.get(stage, {}).items()}
        if set(settings) & (set(RUN_SETTINGS) | set(outputs)):
            raise ConfigError(f"{stage}: {', '.join(sorted(set(settings) & (set(RUN_SETTINGS) | set(outputs))))} is "
                              "set by the pipeline (each stage runs in output_dir/<stage>); remove it")
        resolved = _substitute(settings, names, stage)
        if cfg.retrieval is not None and stage != UNGROUNDED:
            if "retrieval" not in STAGES[stage].model_fields:
                raise ConfigError(f"{stage}: the pipeline's retrieval block cannot ground this stage's prompts yet; "
                                  f"leave the {stage} stage out of a grounded pipeline")
            resolved.setdefault("retrieval", cfg.retrieval)
        if stage in ("sft", UNGROUNDED, "reward", "dpo"):
            resolved.setdefault("model", cfg.model)
        fixed = {"algorithm": stage} if stage in ONLINE else None  # the online stages are named after theirs
        try:
            where = outputs or {"output_dir": cfg.output_dir / stage}
            configs[stage] = load_config(cls, None, settings={**resolved, **where}, fixed=fixed,
                                         runner=f"{stage}: the {stage} stage")
        except ConfigError as e:
            raise ConfigError(str(e).replace("overrides: invalid configuration", f"stage {stage}: invalid settings", 1)) from None
        names[stage] = str(cfg.output_dir / stage)
    if not configs:
        raise ConfigError(f"the pipeline has no stages: give at least one of {', '.join(STAGES)}")
    return configs


def _fingerprint(stage_cfg: BaseModel) -> dict[str, Any]:
    outputs = {k for files in OUTPUT_FILES.values() for k in files}
    return {k: v for k, v in stage_cfg.model_dump(mode="json").items() if k not in RUN_SETTINGS and k not in outputs}


def _defaults(stage_cfg: BaseModel) -> dict[str, Any]:
    """The stage's settings that have a default, at their defaults (as the fingerprint writes them)."""
    fields = {k: f for k, f in type(stage_cfg).model_fields.items() if not f.is_required()}
    return type(stage_cfg).model_construct(**{k: f.get_default(call_default_factory=True) for k, f in fields.items()}
                                           ).model_dump(mode="json", include=set(fields), warnings=False)


def _changed_keys(old: dict, new: dict, prefix: str = "", defaults: dict | None = None) -> list[str]:
    """Settings that differ between a finished stage's fingerprint and the config's. A top-level setting the stored
    fingerprint lacks (added to rlhfkit since the stage ran) counts as unchanged where it is at its default."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if k not in old and defaults is not None and k in defaults and b == defaults[k]:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix + k)
    return keys


def _run_stage(stage: str, stage_cfg: Any) -> None:
    if stage in ("sft", UNGROUNDED):
        from rlhfkit.sft import train_sft

        train_sft(stage_cfg)
    elif stage == "feedback":
        from rlhfkit.evaluation.simulate import simulate

        simulate(stage_cfg)
    elif stage == "reward":
        from rlhfkit.reward.train import train_reward_model

        train_reward_model(stage_cfg)
    elif stage in ONLINE:
        from rlhfkit.online import train_ppo

        train_ppo(stage_cfg)
    elif stage == "dpo":
        from rlhfkit.dpo import train_dpo

        train_dpo(stage_cfg)
    else:
        from rlhfkit.evaluation import evaluate

        evaluate(stage_cfg)


def run_pipeline(cfg: PipelineConfig, restart_from: str | None = None) -> PipelineResult:
    """Run the stages not yet finished, then write the report (see the module docstring)."""
    from rlhfkit.runs import checkpoints

    configs = stage_configs(cfg)
    if restart_from is not None and restart_from not in configs:
        raise ConfigError(f"--restart-from {restart_from}: no such stage here ({', '.join(configs)})")
    order = list(configs)
    result = PipelineResult(cfg.output_dir)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    for stage, stage_cfg in configs.items():
        out: Path = cfg.output_dir / stage
        marker = out / DONE_FILE
        rerun = restart_from is not None and order.index(stage) >= order.index(restart_from)
        if marker.is_file() and not rerun:
            done = json.loads(marker.read_text(encoding="utf-8"))
            changed = _changed_keys(done["config"], _fingerprint(stage_cfg), defaults=_defaults(stage_cfg))
            if changed:
                raise ConfigError(
                    f"stage {stage} finished in {out} with other settings (changed: {', '.join(changed)}). "
                    f"Pass --restart-from {stage} to run it and the stages after it again, or choose another output_dir."
                )
            logger.info("%s: finished before, skipped", stage)
            result.stages.append(StageRun(stage, out, "skipped", done["seconds"]))
            continue
        status = "ran"
        if rerun and out.exists():
            shutil.rmtree(out)  # asked for explicitly with --restart-from
        elif hasattr(stage_cfg, "resume_from") and out.is_dir() and checkpoints(out):
            stage_cfg = stage_cfg.model_copy(update={"resume_from": "latest"})
            status = "resumed"
        elif out.is_dir() and any(out.iterdir()):
            logger.warning("%s: an unfinished run without checkpoints is in %s; starting it again", stage, out)
            stage_cfg = stage_cfg.model_copy(update={"overwrite": True})
        logger.info("%s: %s", stage, "resuming from its last checkpoint" if status == "resumed" else "running")
        start = time.perf_counter()
        _run_stage(stage, stage_cfg)
        seconds = time.perf_counter() - start
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": _fingerprint(stage_cfg), "seconds": round(seconds, 1),
                                   "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2), encoding="utf-8")
        tmp.replace(marker)
        result.stages.append(StageRun(stage, out, status, seconds))

    from rlhfkit.evaluation.report import write_report

    # The report is derived from the stages' outputs: it is remade on every run.
    result.report = write_report(cfg.output_dir, cfg.output_dir / "report.html", overwrite=True)
    eval_file = cfg.output_dir / "eval" / "eval.json"
    if "eval" in configs and eval_file.is_file():
        result.evaluation = json.loads(eval_file.read_text(encoding="utf-8"))
    return result
