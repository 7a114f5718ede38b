"""Reward-model training on human preferences: Bradley-Terry over every pair of a ranking (InstructGPT).

    loss = -log sigmoid(r_chosen - r_rejected - margin)          for a pair with a preference
    loss = -1/2 [log sigmoid(d) + log sigmoid(-d)], d = r_a - r_b   for a kept tie (label 1/2)

The K completions of a prompt go through the model once, in one batch, and all their pairs are formed from
those K scores: K forwards give K(K-1)/2 comparisons, and no completion is over-fitted by being seen once per
pair it belongs to.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlhfkit.config import RewardConfig, dump_config
from rlhfkit.data.preference import PreferenceItem, load_preference_items
from rlhfkit.reward.diagnostics import diagnose_reward_model
from rlhfkit.reward.model import RewardModel
from rlhfkit.runs import MetricsWriter, adamw, install_files, make_accelerator, prepare_output_dir

logger = logging.getLogger(__name__)


@dataclass
class PreferenceBatch:
    """The completions of several items as one batch of sequences, and their comparisons as index tensors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen: torch.Tensor  # row indices into the batch
    rejected: torch.Tensor
    margin: torch.Tensor
    tie_a: torch.Tensor
    tie_b: torch.Tensor

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def collate_items(items: list[PreferenceItem], model: RewardModel) -> PreferenceBatch:
    prompts, responses, chosen, rejected, margin, tie_a, tie_b = [], [], [], [], [], [], []
    for item in items:
        offset = len(responses)
        prompts += [item.prompt] * len(item.completions)
        responses += item.completions
        chosen += [offset + i for i, _ in item.pairs]
        rejected += [offset + j for _, j in item.pairs]
        margin += item.margins
        tie_a += [offset + i for i, _ in item.ties]
        tie_b += [offset + j for _, j in item.ties]
    enc = model.tokenize(prompts, responses)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PreferenceBatch(enc["input_ids"], enc["attention_mask"], as_long(chosen), as_long(rejected),
                           torch.tensor(margin, dtype=torch.float32), as_long(tie_a), as_long(tie_b))


def bradley_terry_loss(rewards: torch.Tensor, batch: PreferenceBatch) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch's comparisons, and how many comparisons there are."""
    d = rewards[batch.chosen] - rewards[batch.rejected] - batch.margin
    loss = -F.logsigmoid(d).sum()
    if batch.tie_a.numel():
        t = rewards[batch.tie_a] - rewards[batch.tie_b]
        loss = loss - 0.5 * (F.logsigmoid(t) + F.logsigmoid(-t)).sum()
    return loss, d.numel() + batch.tie_a.numel()


def preference_metrics(margins: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """From r_chosen - r_rejected over held-out pairs: accuracy, mean margin, and expected calibration error of
    P(chosen preferred) = sigmoid(margin), in equal-width bins of the predicted side's confidence."""
    p = torch.sigmoid(margins.double())
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).double()
    ece = 0.0
    edges = torch.linspace(0.5, 1.0, bins + 1, dtype=torch.float64)
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        in_bin = (confidence >= lo) & ((confidence < hi) if k < bins - 1 else (confidence <= hi))
        if in_bin.any():
            ece += in_bin.double().mean().item() * abs(correct[in_bin].mean().item() - confidence[in_bin].mean().item())
    return {"accuracy": correct.mean().item(), "mean_margin": margins.double().mean().item(), "calibration_error": ece,
            "pairs": float(margins.numel())}


def pair_margins(model: RewardModel, items: list[PreferenceItem], batch_size: int = 16) -> torch.Tensor:
    """r_chosen - r_rejected for every pair of `items` (raw scores; each completion scored once)."""
    prompts = [it.prompt for it in items for _ in it.completions]
    responses = [c for it in items for c in it.completions]
    scores = model.raw_scores(prompts, responses, batch_size)
    margins, offset = [], 0
    for it in items:
        margins += [scores[offset + i] - scores[offset + j] for i, j in it.pairs]
        offset += len(it.completions)
    return torch.stack(margins) if margins else torch.zeros(0)


def train_reward_model(cfg: RewardConfig) -> dict[str, float]:
    """Train, normalise and save a reward model; returns the final held-out metrics (empty without eval_file)."""
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir)
    prepare_output_dir(accelerator, cfg.output_dir, cfg.overwrite, resuming=False)
    if accelerator.is_main_process:
        dump_config(cfg, cfg.output_dir / "config.yaml")
    set_seed(cfg.seed)

    train_items = load_preference_items(cfg.train_file, keep_ties=cfg.keep_ties)
    eval_items = load_preference_items(cfg.eval_file) if cfg.eval_file else []
    logger.info("%d training prompts with %d comparisons", len(train_items), sum(len(i.pairs) + len(i.ties) for i in train_items))

    model = RewardModel.from_base(cfg.model, max_length=cfg.max_length)
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        model.backbone = get_peft_model(model.backbone, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules))
    model.to(accelerator.device)
    model.train()

    loader = DataLoader(train_items, batch_size=cfg.batch_size, shuffle=True, collate_fn=lambda b: collate_items(b, model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * len(loader))
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    accelerator.init_trackers("tensorboard")
    metrics = MetricsWriter(cfg.output_dir / "metrics.jsonl", enabled=accelerator.is_main_process)

    def evaluate(step: int) -> dict[str, float]:
        if not eval_items:
            return {}
        result = preference_metrics(pair_margins(accelerator.unwrap_model(model), eval_items, cfg.eval_batch_size))
        values = {f"eval/{k}": v for k, v in result.items()}
        metrics.write(step, values)
        accelerator.log(values, step=step)
        return result

    before = evaluate(0)
    step, window_loss, window_pairs, window_correct = 0, 0.0, 0, 0
    progress = tqdm(total=total_steps, desc="reward", disable=not accelerator.is_local_main_process)
    while step < total_steps:
        loader.set_epoch(step // len(loader))
        for batch in loader:
            batch = batch.to(accelerator.device)
            rewards = model(batch.input_ids, batch.attention_mask)
            loss_sum, n_pairs = bradley_terry_loss(rewards, batch)
            # mean over the comparisons of the step, across processes (DDP averages gradients, hence the factor)
            total_pairs = accelerator.reduce(torch.tensor(n_pairs, device=accelerator.device), "sum").clamp(min=1)
            accelerator.backward(loss_sum * accelerator.num_processes / total_pairs)
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            window_loss += loss_sum.item()
            window_pairs += n_pairs
            window_correct += (rewards[batch.chosen] > rewards[batch.rejected]).sum().item()
            if step % cfg.log_every == 0 or step == total_steps:
                values = {"train/loss": window_loss / max(window_pairs, 1), "train/accuracy": window_correct / max(window_pairs, 1),
                          "train/lr": scheduler.get_last_lr()[0]}
                metrics.write(step, values)
                accelerator.log(values, step=step)
                progress.set_postfix(loss=f"{values['train/loss']:.4f}", acc=f"{values['train/accuracy']:.2f}")
                window_loss, window_pairs, window_correct = 0.0, 0, 0
            if step >= total_steps:
                break
    progress.close()

    final = accelerator.unwrap_model(model)
    if cfg.lora.enabled:
        final.backbone = final.backbone.merge_and_unload()
    # Normalise on the training completions: rewards then have mean 0 and std 1 there.
    final.set_normalization(torch.cat([final.raw_scores([it.prompt] * len(it.completions), it.completions, cfg.eval_batch_size)
                                       for it in train_items]))
    after = evaluate(step)
    if accelerator.is_main_process:
        tmp = cfg.output_dir / ".final.tmp"
        final.save_pretrained(tmp)
        install_files(tmp, cfg.output_dir, last=("reward_model.json",))
        if cfg.eval_file:  # rankings: best-of-K, Kendall's tau, length bias, the annotators' own agreement
            diagnose_reward_model(final, cfg.eval_file, cfg.eval_batch_size, cfg.output_dir)
    metrics.close()
    accelerator.end_training()
    return {"before_" + k: v for k, v in before.items()} | after
