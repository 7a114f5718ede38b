"""Supervised fine-tuning: teach a pretrained model the ideal responses, with the loss on response tokens only.

Built on the run skeleton (rlhfkit.runs) over `accelerate.Accelerator`: one process here, `accelerate launch` for
DDP / FSDP / DeepSpeed.
The loss of an optimizer step is the mean over every response token in that step (all micro-batches of the
gradient accumulation, all processes), so the result does not depend on how a batch is split.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rlhfkit.config import SFTConfig
from rlhfkit.data.chat import IGNORE_INDEX, TokenizedExample, conversation_messages, tokenize_conversation
from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.data.records import SFTExample, load_sft_examples
from rlhfkit.errors import DataError
from rlhfkit.losses import causal_lm_loss
from rlhfkit.models.loading import apply_lora, load_causal_lm, load_tokenizer
from rlhfkit.retrieval import Grounding
from rlhfkit.rollout import generate_responses
from rlhfkit.rollout.prefix import keep_logits
from rlhfkit.runs import Run, StepOutcome, save_final_model, save_trainable_only, seed_step
from rlhfkit.text.embedding import load_embedder
from rlhfkit.text.rouge import rouge_l

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
    """Summed next-token cross-entropy over labelled tokens (`causal_lm_loss`), and how many tokens that is.

    The LM head runs only over the positions from the first that predicts a labelled token in any row to the last
    (prompt tokens need no vocabulary projection): the same loss, with less work where prompts are long."""
    labels = batch["labels"]
    predicting = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().flatten()  # positions t scored against t + 1
    start, stop = (predicting[0].item(), predicting[-1].item() + 2) if len(predicting) else (0, labels.shape[1])
    keep = keep_logits(model, start, stop, labels.shape[1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **keep).logits
    return causal_lm_loss(logits, labels[:, start:stop] if keep else labels)


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
    """Fine-tune as `cfg` says (resuming where it names a checkpoint); see `SFTTrainer`."""
    return SFTTrainer(cfg).train()


class SFTTrainer:
    """One SFT run on the run skeleton (rlhfkit.runs.Run), in phases: set-up (inputs, then the model, its answers to
    the preview prompts before training, optimizer, schedule and batches, the held-out loss before), the optimizer
    steps (`step`, then `after_step`: log, evaluate, save where their schedules fall), and `finish`."""

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.run = run = Run(cfg)
        # Inputs first: a run refused for bad data or an unknown model leaves no output directory behind.
        self.tokenizer = load_tokenizer(cfg.model)
        grounding = Grounding.from_settings(cfg.retrieval)
        train_set = tokenize_examples(cfg.train_file, self.tokenizer, cfg.max_length, cfg.system_prompt, grounding,
                                      training=True)
        eval_set = tokenize_examples(cfg.eval_file, self.tokenizer, cfg.max_length, cfg.system_prompt,
                                     grounding) if cfg.eval_file else []
        candidates = load_sft_examples(cfg.eval_file or cfg.train_file)  # spread over the file, often grouped by topic
        n = cfg.preview.num_prompts
        self.preview_examples: list[SFTExample] = candidates[:: max(1, len(candidates) // max(1, n))][:n]
        model = load_causal_lm(cfg.model, dtype="float32" if not cfg.load_in_4bit else "auto",
                               load_in_4bit=cfg.load_in_4bit)
        run.open()
        model = self._adapt(model)
        self.before = _preview(model, self.tokenizer, self.preview_examples, cfg, run.accelerator)
        self._prepare(model, train_set, eval_set)
        self.result = SFTResult(output_dir=cfg.output_dir, steps=0)
        if self.eval_dl is not None:
            self.result.eval_loss_before = evaluate_loss(self.model, self.eval_dl, run.accelerator)
        if run.resuming:
            self.result.train_loss_first = run.resume().get("train_loss_first")
        elif self.eval_dl is not None:
            run.log({"eval/loss": self.result.eval_loss_before})

    def _adapt(self, model):
        """Training settings of the model: no KV cache, gradient checkpointing, LoRA; on the run's device."""
        cfg = self.cfg
        model.config.use_cache = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora, quantized=cfg.load_in_4bit)
            self.run.accelerator.register_save_state_pre_hook(save_trainable_only)
        return model.to(self.run.device)

    def _prepare(self, model, train_set: list[TokenizedExample], eval_set: list[TokenizedExample]) -> None:
        """Batches, optimizer, schedule, prepared by accelerate."""
        cfg, accelerator = self.cfg, self.run.accelerator
        make_batch = lambda examples: collate(examples, self.tokenizer.pad_token_id)  # noqa: E731
        train_dl = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, collate_fn=make_batch)
        self.model, self.optimizer, self.scheduler, self.params, self.schedule = self.run.prepare_epochs(model, train_dl)
        eval_dl = DataLoader(eval_set, batch_size=cfg.eval_batch_size, collate_fn=make_batch) if eval_set else None
        self.eval_dl = accelerator.prepare(eval_dl) if eval_dl is not None else None

    def save_checkpoint(self) -> None:
        self.run.save_checkpoint({"train_loss_first": self.result.train_loss_first})

    def train(self) -> SFTResult:
        run = self.run
        self.progress = tqdm(total=self.schedule.total, initial=run.step, desc="sft",
                             disable=not run.accelerator.is_local_main_process)
        self.model.train()
        for group in self.schedule.groups(run):
            self.after_step(self.step(group))
        self.progress.close()
        return self.finish()

    def step(self, group: list[dict[str, torch.Tensor]]) -> StepOutcome:
        """One optimizer step over the micro-batches of `group`: the loss is the mean over every response token of
        the step, on every process (DDP averages gradients across processes, hence the factor num_processes)."""
        run, accelerator = self.run, self.run.accelerator
        seed_step(self.cfg.seed, run.step)
        n_tokens = accelerator.reduce(sum((b["labels"][:, 1:] != IGNORE_INDEX).sum() for b in group), "sum")
        step_loss = torch.zeros((), device=run.device)
        for i, batch in enumerate(group):
            with nullcontext() if i == len(group) - 1 else accelerator.no_sync(self.model):
                loss_sum, _ = token_loss_sum(self.model, batch)
                accelerator.backward(loss_sum * accelerator.num_processes / n_tokens)
            step_loss += loss_sum.detach()
        outcome = run.update(self.optimizer, self.scheduler, self.params, step_loss)
        self.progress.update(1)
        if outcome.ok:
            run.window.add({"loss": accelerator.reduce(step_loss, "sum").item(), "tokens": int(n_tokens.item())})
        return outcome

    def after_step(self, outcome: StepOutcome) -> None:
        """Log, evaluate and save where their schedules fall (each `*_every` steps, else at each epoch's end); the
        last step's checkpoint is `finish`'s."""
        cfg, run, result, schedule = self.cfg, self.run, self.result, self.schedule
        step = run.step
        if step % cfg.log_every == 0 or schedule.end_of_epoch(step):
            sums = run.window.take()
            train_loss = sums.get("loss", 0.0) / max(sums.get("tokens", 0), 1)
            result.train_loss_first = result.train_loss_first or train_loss
            result.train_loss_last = train_loss
            run.log({"train/loss": train_loss, "train/lr": self.scheduler.get_last_lr()[0],
                     "train/grad_norm": outcome.grad_norm, "train/epoch": step / schedule.steps_per_epoch})
            self.progress.set_postfix(loss=f"{train_loss:.4f}")
        if self.eval_dl is not None and schedule.due(cfg.eval_every, step):
            result.eval_loss_after = evaluate_loss(self.model, self.eval_dl, run.accelerator)
            run.log({"eval/loss": result.eval_loss_after})
            self.progress.set_postfix(loss=f"{result.train_loss_last or 0:.4f}", eval=f"{result.eval_loss_after:.4f}")
        if schedule.due(cfg.save_every, step) and step < schedule.total:
            self.save_checkpoint()

    def finish(self) -> SFTResult:
        """The held-out loss after (where the last step was not evaluated), the last checkpoint, the model, and the
        preview prompts' answers after training beside those before."""
        cfg, run, result = self.cfg, self.run, self.result
        if self.eval_dl is not None and result.eval_loss_after is None:
            result.eval_loss_after = evaluate_loss(self.model, self.eval_dl, run.accelerator)
        result.steps = run.step
        self.save_checkpoint()
        model = run.accelerator.unwrap_model(self.model)
        save_final_model(model, self.tokenizer, cfg.output_dir, run.accelerator, adapter=cfg.lora.enabled,
                         merge=cfg.merge_adapter)
        after = _preview(model, self.tokenizer, self.preview_examples, cfg, run.accelerator)
        result.previews = [{"prompt": ex.prompt, "reference": ex.messages[-1].content, "before": b, "after": a}
                           for ex, b, a in zip(self.preview_examples, self.before, after)]
        if run.accelerator.is_main_process and result.previews:
            self._write_previews()
        run.close()
        return result

    def _write_previews(self) -> None:
        """samples.jsonl: each preview prompt's reference, before and after answers, scored against the reference."""
        previews = self.result.previews
        scores = preview_reference_scores(previews)
        self.result.preview_metrics = {which: {k: sum(v) / len(v) for k, v in per.items()}
                                       for which, per in scores.items()}
        write_jsonl(self.cfg.output_dir / "samples.jsonl", [
            {"prompt": p["prompt"], "response": p[which], "model": which,
             "scores": {k: v[i] for k, v in scores[which].items()} if which in scores else {}}
            for i, p in enumerate(previews) for which in ("reference", "before", "after")
        ])


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
