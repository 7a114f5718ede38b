"""What every trainer shares: the Accelerator and its trackers, run directories (guarded creation, resolved config,
metrics.jsonl, whole-or-nothing checkpoints), the optimizer step with its NaN/Inf guard, and per-step seeding; and
`Run`, the skeleton each trainer plugs its own phases into (with `EpochSchedule` for the trainers that go over a
dataset in epochs).

A run's life, the same for every trainer:
  1. `Run(cfg)`        the Accelerator, the checkpoint to resume (if any), the output directory checked (nothing
                       written yet), the seed;
  2. the trainer reads and checks its inputs (a run refused for bad input leaves nothing behind), then
     `run.open()`      the output directory, config.yaml, the trackers, metrics.jsonl, the NaN guard;
  3. the trainer builds and prepares its models, then `run.resume()` where there is a checkpoint: weights, optimizer,
                       schedule, RNG, the step, the metrics window, and the trainer's own entries of the state;
  4. its steps:        `run.update` (the optimizer step, counted, NaN/Inf skipped and counted), `run.window` (sums
                       since the last log), `run.log`, `run.save_checkpoint` (one state layout for every trainer);
  5. `run.close()`     after the trainer's final checkpoint and model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from transformers import get_scheduler

from rlhfkit.config import dump_config
from rlhfkit.errors import ConfigError, NonFiniteError, OutputError, OutputExistsError
from rlhfkit.models.loading import bf16_supported

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: its presence marks the checkpoint complete


def make_accelerator(mixed_precision: str, output_dir: Path, report_to: list[str] | str = "tensorboard") -> Accelerator:
    """The Accelerator every trainer runs on, logging to the trackers in `report_to` (any that accelerate supports;
    local ones such as TensorBoard write under `output_dir/logs`).

    `mixed_precision="auto"` means bf16 where the GPU supports it, none elsewhere. On a machine without a GPU,
    processes started by `torchrun --nproc_per_node N` form a multi-CPU (gloo) group.
    """
    if mixed_precision == "auto":
        mixed_precision = "bf16" if bf16_supported() else "no"
    return Accelerator(
        cpu=not torch.accelerator.is_available(),
        mixed_precision=mixed_precision,
        log_with=trackers(report_to),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


def trackers(report_to: list[str] | str) -> list[str]:
    """`report_to` checked against what this machine has: a tracker whose package is missing is an error here,
    where accelerate would only skip it silently."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["none"], []):
        return []
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in LoggerType.list():
            raise ConfigError(f"report_to: unknown tracker {name!r}; choose from none, {', '.join(LoggerType.list())}")
        if name != "all" and name not in available:
            raise ConfigError(f"report_to: {name} is not installed here (pip install {name}), or drop it from report_to")
    return names


def open_run(accelerator: Accelerator, config, resuming: bool) -> None:
    """Start a run whose inputs have been read and checked: its output directory (`prepare_output_dir`), the resolved
    settings in it (config.yaml), and its trackers (`start_tracking`)."""
    prepare_output_dir(accelerator, config.output_dir, config.overwrite, resuming)
    if accelerator.is_main_process:
        dump_config(config, config.output_dir / "config.yaml")
    start_tracking(accelerator, config, resuming)


def start_tracking(accelerator: Accelerator, config, resuming: bool) -> None:
    """Open the trackers (project `rlhfkit`; TensorBoard writes to output_dir/logs/rlhfkit) with the run's settings.

    A tracker that cannot start (MLflow 3.13+ refuses its default file store unless MLFLOW_ALLOW_FILE_STORE=true or
    MLFLOW_TRACKING_URI names a database or server) stops the run on every process with a ConfigError, and a
    directory made for this run is removed again: nothing is left behind.
    """
    failure = [None]
    if accelerator.is_main_process:
        try:
            accelerator.init_trackers("rlhfkit", config=flat_settings(config.model_dump(mode="json")))
        except Exception as e:  # noqa: BLE001 - any tracker's own error type
            failure = [f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"]
            if not resuming:
                shutil.rmtree(config.output_dir, ignore_errors=True)
    broadcast_object_list(failure)
    if failure[0] is not None:
        raise ConfigError(f"report_to {config.report_to}: a tracker cannot start ({failure[0]}); fix its settings "
                          "(MLflow: MLFLOW_TRACKING_URI=sqlite:///mlflow.db, or MLFLOW_ALLOW_FILE_STORE=true) or drop "
                          "it from report_to")


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as `a.b: value` with scalar values, the form trackers' hyperparameter tables take."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


def seed_step(seed: int, step: int) -> None:
    """Seed every random generator (Python, numpy, torch on every device) from (seed, step), at the start of an
    optimizer step.

    Dropout then draws the same masks in step N however the run got there: an uninterrupted run, or one resumed
    from a checkpoint, whose data-loader start-up, evaluation and previews consumed random numbers at other times.
    """
    set_seed((seed * 1_000_003 + step) % 2**32)


class StepOutcome(NamedTuple):
    ok: bool  # False: the loss was NaN/Inf (or, without fp16 loss scaling, the gradients were); nothing was applied
    grad_norm: float  # of the unscaled gradients, before clipping (inf/nan when they overflowed)


def optimizer_step(accelerator: Accelerator, optimizer, scheduler, params, max_grad_norm: float,
                   loss: torch.Tensor) -> StepOutcome:
    """One optimizer update after the backward passes of a step: clip, step, advance the LR schedule, zero grads.

    `loss` is this process's loss of the step; it counts as finite only if it is on every process. A non-finite loss
    skips the update and returns ok=False, for the caller to count (see `NonFiniteGuard`). Under fp16 the update
    goes through accelerate's GradScaler in every other case: when the gradients overflow, the scaler skips the
    update and lowers its scale (`accelerator.optimizer_step_was_skipped`); that is routine loss scaling, and ok.
    Without a scaler, non-finite gradients skip the update and return ok=False. The schedule advances either way,
    so the learning rate stays a function of the step.
    """
    loss_finite = bool(torch.isfinite(accelerator.reduce(loss.detach().float().sum().reshape(1), "sum")).all())
    scaled = accelerator.scaler is not None
    grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm))  # unscales the gradients under fp16
    ok = loss_finite and (scaled or torch.isfinite(torch.tensor(grad_norm)).item())
    if ok or scaled:  # fp16 with a NaN loss: the gradients are NaN too, and the scaler skips the update
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(ok, grad_norm)


class NonFiniteGuard:
    """Counts updates skipped by `optimizer_step` (ok=False): a warning for each, and past `tolerated` the run stops
    with NonFiniteError (checkpoints already written stay as they are)."""

    def __init__(self, tolerated: int, count: int = 0):
        self.tolerated, self.count = tolerated, count

    def failed(self, step: int) -> None:
        self.count += 1
        warnings.warn(f"step {step}: NaN or Inf in the loss or gradients; this update is skipped "
                      f"({self.count} so far, {self.tolerated} tolerated)", stacklevel=2)
        if self.count > self.tolerated:
            raise NonFiniteError(
                f"stopped at step {step}: {self.count} updates had NaN or Inf in the loss or gradients. Saved "
                "checkpoints are untouched. Common causes: data that gives a NaN loss, too high a learning_rate, or "
                "fp16 overflow (try mixed_precision=bf16 or no).")


def adamw(params, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel where torch has one for the parameters' device (CPU and CUDA float tensors).

    On CPU torch's default is a per-tensor Python loop: the fused kernel makes a 135M-parameter step ~5x faster.
    """
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def check_output_dir(path: Path, overwrite: bool, resuming: bool) -> bool:
    """Refuse an output_dir that cannot be used, before any work: a file, a path through a file, or a non-empty
    directory that is neither resumed nor to be overwritten. Returns whether an existing run will be replaced."""
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"output_dir {path} exists and is a file")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"cannot create output_dir {path}: {blocker} is a file")
    replace = path.is_dir() and any(path.iterdir()) and not resuming
    if replace and not overwrite:
        held = ", ".join(sorted(p.name for p in path.iterdir())[:5])
        raise OutputExistsError(
            f"output_dir {path} already holds results ({held}); pass overwrite=true to replace it, "
            "resume_from=latest to continue its last checkpoint, or choose another output_dir"
        )
    return replace


def prepare_output_dir(accelerator: Accelerator, path: Path, overwrite: bool, resuming: bool) -> None:
    """Create `path` (after `check_output_dir`'s checks), replacing an earlier run if told to overwrite it.

    Call it once the inputs have been read and checked, so that a run refused for bad input leaves nothing behind.
    Every process checks (so that a refusal stops them all, not just the main one) before the main process acts.
    """
    replace = check_output_dir(path, overwrite, resuming)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if replace:
                shutil.rmtree(path)
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create output_dir {path}: {e.strerror or e}") from None
    accelerator.wait_for_everyone()


def checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = []
    for p in output_dir.glob("checkpoint-*"):
        m = CHECKPOINT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: Path, resume_from: Path | str | None) -> Path | None:
    if resume_from is None:
        return None
    if str(resume_from) == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise ConfigError(f"resume_from=latest: {output_dir} holds no complete checkpoint-N directory")
        return found[-1]
    path = Path(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from={path}: not a complete checkpoint (no {STATE_FILE} in it)")
    return path


def checkpoint_tmp_path(output_dir: Path, step: int) -> Path:
    """Where a checkpoint is written before `commit_checkpoint` renames it into place."""
    return output_dir / f".checkpoint-{step}.tmp"


def commit_checkpoint(output_dir: Path, step: int, state: dict[str, Any], keep: int | None) -> Path:
    """Finish a checkpoint written to its tmp path: add the state file, rename it into place, prune old ones.

    A crash at any point leaves every earlier checkpoint whole and no partial `checkpoint-N`.
    """
    tmp = checkpoint_tmp_path(output_dir, step)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    final = output_dir / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    return final


def read_checkpoint_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE_FILE).read_text())


def install_files(src: Path, dst: Path, last: tuple[str, ...]) -> None:
    """Move every file of `src` into `dst`, the files named in `last` at the end, then remove `src`.

    Used to publish a final model: its config files (`last`) appear only once the weights are in place.
    """
    names = sorted(p.name for p in src.iterdir())
    for name in [n for n in names if n not in last] + [n for n in names if n in last]:
        target = dst / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(src / name, target)
    src.rmdir()


class MetricsWriter:
    """Appends one JSON object per logging step to metrics.jsonl (flushed, so a crash loses nothing logged).

    Each row has `step` and `time`: seconds of training since the run started, summed over its resumptions.
    """

    def __init__(self, path: Path, enabled: bool = True, resumed_at: int | None = None):
        """`resumed_at`: the step a run resumes from; rows logged after it (by the run that was killed, and that
        the resumed run will log again) are dropped, so every step appears once, and `time` goes on from the last
        row kept."""
        self.enabled = enabled
        elapsed = 0.0
        if enabled and resumed_at is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resumed_at]
            elapsed = max((json.loads(line).get("time", 0.0) for line in kept), default=0.0)
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
        self._file = path.open("a", encoding="utf-8") if enabled else None
        self._start = time.time() - elapsed

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            return
        record = {"step": step, "time": round(time.time() - self._start, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def save_trainable_only(models, weights, output_dir) -> None:
    """accelerate save-state hook: keep only trainable tensors (LoRA adapters, heads) in checkpoints.

    The frozen base is reloaded from the model name on resume; checkpoints stay megabytes, not gigabytes.
    """
    for model, state in zip(models, weights):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        for key in [k for k in state if k not in trainable]:
            del state[key]


def save_final_model(model, tokenizer, output_dir: Path, accelerator: Accelerator, adapter: bool, merge: bool) -> None:
    """The final model in HF format in `output_dir`: the adapter, or full (merged) weights. Configs land last,
    so a directory with a config.json or adapter_config.json holds a whole model."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    tmp = output_dir / ".final.tmp"
    if adapter and merge:
        model = model.merge_and_unload()
    # An adapter never trains the embeddings here, so PEFT need not look up the base's vocabulary to decide.
    extra = {"save_embedding_layers": False} if adapter and not merge else {}
    model.save_pretrained(tmp, safe_serialization=True, **extra)
    tokenizer.save_pretrained(tmp)
    install_files(tmp, output_dir, last=("config.json", "adapter_config.json"))


class MetricsWindow:
    """Sums of training figures since the last logged step (the logged means are sums over counts). Saved in every
    checkpoint, so that a resumed run logs the figures an uninterrupted one does even when it resumes between two
    logs."""

    def __init__(self, sums: dict[str, float] | None = None):
        self.sums: dict[str, float] = dict(sums or {})

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)

    def take(self) -> dict[str, float]:
        """The sums so far (a figure never added is absent), and an empty window."""
        sums, self.sums = self.sums, {}
        return sums


class EpochTraining(NamedTuple):
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    params: list
    schedule: EpochSchedule


class Run:
    """The skeleton of one training run (see the module docstring): accelerator, output directory, checkpoints and
    resume with one state layout, the NaN/Inf guard, metrics and their window. A trainer holds one and adds its
    phases."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.report_to)
        self.checkpoint = resolve_checkpoint(cfg.output_dir, cfg.resume_from)
        check_output_dir(cfg.output_dir, cfg.overwrite, resuming=self.resuming)  # fail fast, write nothing yet
        set_seed(cfg.seed)
        self.state = read_checkpoint_state(self.checkpoint) if self.resuming else {}
        if "global_step" in self.state:  # SFT's and DPO's name for the step in checkpoints before the layout was one
            self.state["step"] = self.state.pop("global_step")
        self.step = 0  # optimizer steps done (online RL: iterations)
        self.window = MetricsWindow()
        self.metrics: MetricsWriter | None = None
        self.guard: NonFiniteGuard | None = None

    @property
    def resuming(self) -> bool:
        return self.checkpoint is not None

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def open(self) -> None:
        """Once the inputs are read and checked: the output directory, config.yaml, trackers, metrics.jsonl (rows a
        killed run logged after its checkpoint dropped) and the NaN guard (its count goes on)."""
        cfg, accelerator = self.cfg, self.accelerator
        open_run(accelerator, cfg, self.resuming)
        self.metrics = MetricsWriter(cfg.output_dir / "metrics.jsonl", enabled=accelerator.is_main_process,
                                     resumed_at=self.state.get("step"))
        self.guard = NonFiniteGuard(cfg.max_nonfinite_updates, self.state.get("nonfinite_updates", 0))

    def prepare_epochs(self, model, loader) -> EpochTraining:
        """An epoch trainer's optimisation (SFT, reward model, DPO): AdamW over the trainable parameters, the model,
        optimizer and batches prepared by accelerate, the step schedule over epochs, and the learning-rate schedule
        (stepped by the trainer once per optimizer step, so registered for checkpointing rather than prepared,
        which would step it once per process)."""
        cfg, accelerator = self.cfg, self.accelerator
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        schedule = EpochSchedule(loader, cfg.gradient_accumulation_steps, cfg.epochs, cfg.max_steps)
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * schedule.total),
                                  num_training_steps=schedule.total)
        accelerator.register_for_checkpointing(scheduler)
        return EpochTraining(model, optimizer, scheduler, params, schedule)

    def resume(self) -> dict[str, Any]:
        """Weights, optimizer, schedule and RNG from the checkpoint (into the prepared models), the step and the
        metrics window; returns the checkpoint's state, where the trainer finds its own entries."""
        self.accelerator.load_state(str(self.checkpoint), strict=False)
        self.step = self.state["step"]
        self.window = MetricsWindow(self.state.get("window"))
        logger.info("resumed from %s at step %d", self.checkpoint, self.step)
        return self.state

    def update(self, optimizer, scheduler, params, loss: torch.Tensor) -> StepOutcome:
        """`optimizer_step`, then the step counted; a skipped (NaN/Inf) update counts against the guard."""
        outcome = optimizer_step(self.accelerator, optimizer, scheduler, params, self.cfg.max_grad_norm, loss)
        self.step += 1
        if not outcome.ok:
            self.guard.failed(self.step)
        return outcome

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        step = self.step if step is None else step
        self.metrics.write(step, values)
        self.accelerator.log(values, step=step)

    def save_checkpoint(self, state: dict[str, Any] | None = None,
                        write_files: Callable[[Path], None] | None = None) -> None:
        """A checkpoint of this step, whole or not at all: accelerate's state (models, optimizer, schedule, RNG), the
        files `write_files` puts in its directory (main process), and STATE_FILE: the step, the NaN count, the
        metrics window and the trainer's own `state`."""
        accelerator, step = self.accelerator, self.step
        tmp = checkpoint_tmp_path(self.cfg.output_dir, step)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if write_files is not None:
                write_files(tmp)
            full = {"step": step, "nonfinite_updates": self.guard.count, "window": self.window.sums, **(state or {})}
            commit_checkpoint(self.cfg.output_dir, step, full, self.cfg.save_total_limit)
        accelerator.wait_for_everyone()

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        self.accelerator.end_training()


class EpochSchedule:
    """The optimizer steps of a run over a prepared DataLoader in epochs, `accumulation` micro-batches each:
    `epochs` passes (fractions allowed) or `max_steps`."""

    def __init__(self, loader, accumulation: int, epochs: float, max_steps: int | None):
        self.loader, self.accumulation = loader, accumulation
        self.steps_per_epoch = math.ceil(len(loader) / accumulation)  # len: this process's batches
        self.total = max_steps or math.ceil(epochs * self.steps_per_epoch)

    def groups(self, run: Run) -> Iterator[list]:
        """The micro-batches of each optimizer step left, from `run.step` (which the caller advances); resuming
        mid-epoch skips the batches already trained on, in the epoch's same seeded order."""
        while run.step < self.total:
            epoch, done_in_epoch = divmod(run.step, self.steps_per_epoch)
            self.loader.set_epoch(epoch)
            batches = run.accelerator.skip_first_batches(self.loader, done_in_epoch * self.accumulation) \
                if done_in_epoch else self.loader
            iterator = iter(batches)
            while run.step < self.total:
                group = [b for _, b in zip(range(self.accumulation), iterator)]
                if not group:
                    break
                yield group

    def end_of_epoch(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total

    def due(self, every: int | None, step: int) -> bool:
        """Whether a `*_every` schedule falls on `step`: every N steps, or (None) at each epoch's end."""
        return step % every == 0 if every else self.end_of_epoch(step)
