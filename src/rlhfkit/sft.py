"""Supervised fine-tuning: teach a pretrained model the ideal responses, with the loss on response tokens only.

Built on `accelerate.Accelerator`: one process here, `accelerate launch` for DDP / FSDP / DeepSpeed.
The loss of an optimizer step is the mean over every response token in that step (all micro-batches of the
gradient accumulation, all processes), so the result does not depend on how a batch is split.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlhfkit.config import SFTConfig
from rlhfkit.data.chat import IGNORE_INDEX, TokenizedExample, conversation_messages, tokenize_conversation
from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.data.records import SFTExample, load_sft_examples
from rlhfkit.errors import DataError
from rlhfkit.evaluation.reference_metrics import load_embedder, rouge_l
from rlhfkit.losses import causal_lm_loss
from rlhfkit.models.loading import apply_lora, load_causal_lm, load_tokenizer
from rlhfkit.retrieval import Grounding
from rlhfkit.rollout import generate_responses
from rlhfkit.runs import (
    MetricsWriter,
    NonFiniteGuard,
    adamw,
    check_output_dir,
    checkpoint_tmp_path,
    commit_checkpoint,
    make_accelerator,
    optimizer_step,
    open_run,
    read_checkpoint_state,
    resolve_checkpoint,
    save_final_model,
    save_trainable_only,
    seed_step,
)

logger = logging.getLogger(__name__)


@dataclass
class SFTResult:
    output_dir: Path
    steps: int
    train_loss_first: float | None = None  # mean loss of the first logged window
    train_loss_last: float | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    previews: list[dict] = field(default_factory=list)  # {"prompt", "reference", "before", "after"}
    # the previews against the reference answers: {"before"|"after": {"rouge_l"|"similarity": mean over previews}}
    preview_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


def tokenize_examples(path: Path, tokenizer, max_length: int, system_prompt: str | None,
                      grounding=None, training: bool = False) -> list[TokenizedExample]:
    examples = load_sft_examples(path)
    out = []
    for ex in examples:
        try:
            messages = conversation_messages(tokenizer, ex.messages, system_prompt, grounding, max_length, training)
            tokenized = tokenize_conversation(tokenizer, messages, max_length)
        except Exception as e:  # jinja raises its own types (a template that refuses a role, a missing key)
            raise DataError(f"{ex.where}: the model's chat template cannot render this conversation ({e})") from None
        if tokenized.num_target_tokens > 0:
            out.append(tokenized)
    if not out:
        raise DataError(f"{path}: no example has a response token within max_length={max_length}")
    if len(out) < len(examples):
        logger.warning("%s: %d examples have no response token within max_length and are skipped", path, len(examples) - len(out))
    return out


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding has attention 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled tokens (`causal_lm_loss`), and how many tokens that is."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return causal_lm_loss(logits, batch["labels"])


@torch.no_grad()
def evaluate_loss(model, dataloader, accelerator: Accelerator) -> float:
    """Mean loss per response token over the whole held-out set (all processes)."""
    model.eval()
    sums, counts = [], []
    for batch in dataloader:
        loss, n = token_loss_sum(model, batch)
        stats = accelerator.gather_for_metrics(torch.stack([loss.detach(), n.float()]).unsqueeze(0))
        sums.append(stats[:, 0].sum())
        counts.append(stats[:, 1].sum())
    model.train()
    return (torch.stack(sums).sum() / torch.stack(counts).sum()).item()


def train_sft(cfg: SFTConfig) -> SFTResult:
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.report_to)
    checkpoint = resolve_checkpoint(cfg.output_dir, cfg.resume_from)
    check_output_dir(cfg.output_dir, cfg.overwrite, resuming=checkpoint is not None)  # fail fast, write nothing yet
    set_seed(cfg.seed)

    # Inputs first: a run refused for bad data or an unknown model leaves no output directory behind.
    tokenizer = load_tokenizer(cfg.model)
    grounding = Grounding.from_settings(cfg.retrieval)
    train_set = tokenize_examples(cfg.train_file, tokenizer, cfg.max_length, cfg.system_prompt, grounding, training=True)
    eval_set = tokenize_examples(cfg.eval_file, tokenizer, cfg.max_length, cfg.system_prompt,
                                 grounding) if cfg.eval_file else []
    preview_source = cfg.eval_file or cfg.train_file
    candidates = load_sft_examples(preview_source)  # spread over the file, which is often grouped by topic
    preview_examples: list[SFTExample] = candidates[:: max(1, len(candidates) // max(1, cfg.preview.num_prompts))][: cfg.preview.num_prompts]
    model = load_causal_lm(cfg.model, dtype="float32" if not cfg.load_in_4bit else "auto", load_in_4bit=cfg.load_in_4bit)
    open_run(accelerator, cfg, resuming=checkpoint is not None)

    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, quantized=cfg.load_in_4bit)
        accelerator.register_save_state_pre_hook(save_trainable_only)
    model.to(accelerator.device)

    result = SFTResult(output_dir=cfg.output_dir, steps=0)
    before = _preview(model, tokenizer, preview_examples, cfg, accelerator)

    make_batch = lambda examples: collate(examples, tokenizer.pad_token_id)  # noqa: E731
    train_dl = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=make_batch)
    eval_dl = DataLoader(eval_set, batch_size=cfg.eval_batch_size, collate_fn=make_batch) if eval_set else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)

    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    steps_per_epoch = math.ceil(len(train_dl) / cfg.gradient_accumulation_steps)  # len: this process's batches
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps), num_training_steps=total_steps
    )
    # Stepped once per optimizer step by us; registered (not prepared, which would step it once per process).
    accelerator.register_for_checkpointing(scheduler)
    if eval_dl is not None:
        eval_dl = accelerator.prepare(eval_dl)
    state = read_checkpoint_state(checkpoint) if checkpoint is not None else {}
    metrics = MetricsWriter(cfg.output_dir / "metrics.jsonl", enabled=accelerator.is_main_process,
                            resumed_at=state.get("global_step"))
    guard = NonFiniteGuard(cfg.max_nonfinite_updates, state.get("nonfinite_updates", 0))

    def log(step: int, values: dict[str, float]) -> None:
        metrics.write(step, values)
        accelerator.log(values, step=step)

    if eval_dl is not None:
        result.eval_loss_before = evaluate_loss(model, eval_dl, accelerator)

    global_step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint), strict=False)
        global_step = state["global_step"]
        result.train_loss_first = state.get("train_loss_first")
        logger.info("resumed from %s at step %d", checkpoint, global_step)
    elif eval_dl is not None:
        log(0, {"eval/loss": result.eval_loss_before})

    def save_checkpoint(step: int) -> None:
        tmp = checkpoint_tmp_path(cfg.output_dir, step)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"global_step": step, "train_loss_first": result.train_loss_first, "nonfinite_updates": guard.count}
            commit_checkpoint(cfg.output_dir, step, state, cfg.save_total_limit)
        accelerator.wait_for_everyone()

    progress = tqdm(total=total_steps, initial=global_step, desc="sft", disable=not accelerator.is_local_main_process)
    ga = cfg.gradient_accumulation_steps
    window_loss, window_tokens = 0.0, 0
    model.train()
    while global_step < total_steps:
        epoch, done_in_epoch = divmod(global_step, steps_per_epoch)
        train_dl.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_dl, done_in_epoch * ga) if done_in_epoch else train_dl
        iterator = iter(batches)
        while global_step < total_steps:
            group = [b for _, b in zip(range(ga), iterator)]
            if not group:
                break
            seed_step(cfg.seed, global_step)
            # Normaliser: response tokens in the whole optimizer step, over all processes. DDP averages gradients
            # across processes, hence the factor num_processes.
            n_tokens = accelerator.reduce(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in group), "sum")
            step_loss = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(group):
                sync = i == len(group) - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    loss_sum, _ = token_loss_sum(model, batch)
                    accelerator.backward(loss_sum * accelerator.num_processes / n_tokens)
                step_loss += loss_sum.detach()
            outcome = optimizer_step(accelerator, optimizer, scheduler, params, cfg.max_grad_norm, step_loss)
            global_step += 1
            progress.update(1)
            if outcome.ok:
                window_loss += accelerator.reduce(step_loss, "sum").item()
                window_tokens += int(n_tokens.item())
            else:
                guard.failed(global_step)
            end_of_epoch = global_step % steps_per_epoch == 0 or global_step == total_steps
            if global_step % cfg.log_every == 0 or end_of_epoch:
                train_loss = window_loss / max(window_tokens, 1)
                result.train_loss_first = result.train_loss_first or train_loss
                result.train_loss_last = train_loss
                window_loss, window_tokens = 0.0, 0
                values = {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0], "train/grad_norm": outcome.grad_norm, "train/epoch": global_step / steps_per_epoch}
                log(global_step, values)
                progress.set_postfix(loss=f"{train_loss:.4f}")
            if eval_dl is not None and (global_step % cfg.eval_every == 0 if cfg.eval_every else end_of_epoch):
                result.eval_loss_after = evaluate_loss(model, eval_dl, accelerator)
                log(global_step, {"eval/loss": result.eval_loss_after})
                progress.set_postfix(loss=f"{result.train_loss_last or 0:.4f}", eval=f"{result.eval_loss_after:.4f}")
            if (global_step % cfg.save_every == 0 if cfg.save_every else end_of_epoch) and global_step < total_steps:
                save_checkpoint(global_step)
    progress.close()

    if eval_dl is not None and result.eval_loss_after is None:
        result.eval_loss_after = evaluate_loss(model, eval_dl, accelerator)
    result.steps = global_step
    save_checkpoint(global_step)
    save_final_model(accelerator.unwrap_model(model), tokenizer, cfg.output_dir, accelerator,
                     adapter=cfg.lora.enabled, merge=cfg.merge_adapter)

    after = _preview(accelerator.unwrap_model(model), tokenizer, preview_examples, cfg, accelerator)
    result.previews = [
        {"prompt": ex.prompt, "reference": ex.messages[-1].content, "before": b, "after": a}
        for ex, b, a in zip(preview_examples, before, after)
    ]
    if accelerator.is_main_process and result.previews:
        scores = preview_reference_scores(result.previews)
        result.preview_metrics = {which: {k: sum(v) / len(v) for k, v in per.items()} for which, per in scores.items()}
        write_jsonl(cfg.output_dir / "samples.jsonl", [
            {"prompt": p["prompt"], "response": p[which], "model": which,
             "scores": {k: v[i] for k, v in scores[which].items()} if which in scores else {}}
            for i, p in enumerate(result.previews) for which in ("reference", "before", "after")
        ])
    metrics.close()
    accelerator.end_training()
    return result


def preview_reference_scores(previews: list[dict]) -> dict[str, dict[str, list[float]]]:
    """ROUGE-L and semantic similarity of the answers before and after training to the reference answers."""
    references = [p["reference"] for p in previews]
    embedder = load_embedder()
    return {which: {"rouge_l": rouge_l([p[which] for p in previews], references),
                    "similarity": embedder.similarity([p[which] for p in previews], references)}
            for which in ("before", "after")}


def _preview(model, tokenizer, examples: list[SFTExample], cfg: SFTConfig, accelerator: Accelerator) -> list[str]:
    """Greedy answers to the preview prompts (main process only; the others wait)."""
    answers: list[str] = []
    if examples and accelerator.is_main_process:
        answers = generate_responses(
            model, tokenizer, [ex.prompt for ex in examples], max_new_tokens=cfg.preview.max_new_tokens,
            system_prompt=cfg.system_prompt, grounding=Grounding.from_settings(cfg.retrieval),
            max_prompt_length=max(1, cfg.max_length - cfg.preview.max_new_tokens) if cfg.retrieval else None,
        )
    accelerator.wait_for_everyone()
    return answers
