"""Reward-model training on human preferences: Bradley-Terry over every pair of a ranking (InstructGPT).

    loss = -log sigmoid(r_chosen - r_rejected - margin)          for a pair with a preference
    loss = -1/2 [log sigmoid(d) + log sigmoid(-d)], d = r_a - r_b   for a kept tie (label 1/2)

With `length_debias`, a length term stands beside the reward in the loss and is left out of the saved model (a
product of experts, as in Shen et al. 2023's "Loose lips sink ships"): d = r_chosen - r_rejected + beta (l_chosen -
l_rejected), l a completion's length in words / 10, beta the Bradley-Terry coefficient of length alone fitted on
the training pairs before training (`fit_length_coefficient`). The part of the preferences that length explains is
already explained, so the reward is pushed to learn the rest, and the saved reward is r alone.

With `soft_labels`, a pair's label is its vote share q (2 of 3 annotators preferred chosen: q = 2/3), and its loss
-q log sigmoid(d) - (1 - q) log sigmoid(-d), d = r_chosen - r_rejected - margin: the loss of a tie at q = 1/2,
of a hard pair at q = 1.

The K completions of a prompt go through the model once, in one batch, and all their pairs are formed from
those K scores: K forwards give K(K-1)/2 comparisons, and no completion is over-fitted by being seen once per
pair it belongs to.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rlhfkit import losses
from rlhfkit.config import RewardConfig
from rlhfkit.data.preference import PreferenceItem, load_preference_items
from rlhfkit.errors import DataError
from rlhfkit.reward.diagnostics import diagnose_reward_model, ranking_counts
from rlhfkit.reward.fact_swap import load_fact_swaps
from rlhfkit.models.loading import lora_config
from rlhfkit.reward.model import RewardModel
from rlhfkit.runs import Run, install_files, save_trainable_only, seed_step

logger = logging.getLogger(__name__)


@dataclass
class PreferenceBatch:
    """The completions of several items as one batch of sequences, and their comparisons as index tensors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen: torch.Tensor  # row indices into the batch
    rejected: torch.Tensor
    margin: torch.Tensor
    target: torch.Tensor  # P(chosen preferred) per pair: 1, or its vote share with soft labels
    tie_a: torch.Tensor
    tie_b: torch.Tensor
    lengths: torch.Tensor  # per row: the completion's length in words / 10 (the length term's input)

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def collate_items(items: list[PreferenceItem], model: RewardModel, soft_labels: bool = False) -> PreferenceBatch:
    prompts, responses, chosen, rejected, margin, target, tie_a, tie_b = [], [], [], [], [], [], [], []
    for item in items:
        offset = len(responses)
        prompts += [item.prompt] * len(item.completions)
        responses += item.completions
        chosen += [offset + i for i, _ in item.pairs]
        rejected += [offset + j for _, j in item.pairs]
        margin += item.margins
        target += item.shares if soft_labels else [1.0] * len(item.pairs)
        tie_a += [offset + i for i, _ in item.ties]
        tie_b += [offset + j for _, j in item.ties]
    enc = model.tokenize(prompts, responses)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PreferenceBatch(enc["input_ids"], enc["attention_mask"], as_long(chosen), as_long(rejected),
                           torch.tensor(margin, dtype=torch.float32), torch.tensor(target, dtype=torch.float32),
                           as_long(tie_a), as_long(tie_b), torch.tensor([len(r.split()) / 10 for r in responses]))


def fit_length_coefficient(items: list[PreferenceItem], soft_labels: bool = False, iterations: int = 50,
                           ridge: float = 1e-3) -> float:
    """beta maximising sum q log sigmoid(beta x) + (1 - q) log sigmoid(-beta x) - ridge beta^2 / 2 over the items'
    pairs (and kept ties, q = 1/2), x = (l_chosen - l_rejected) in words / 10: Bradley-Terry with length as the only
    feature (Newton's method; the small ridge keeps beta finite where length alone orders every pair)."""
    x, q = [], []
    for item in items:
        lengths = [len(c.split()) / 10 for c in item.completions]
        shares = item.shares if soft_labels else [1.0] * len(item.pairs)
        x += [lengths[i] - lengths[j] for i, j in item.pairs] + [lengths[i] - lengths[j] for i, j in item.ties]
        q += list(shares) + [0.5] * len(item.ties)
    x, q, beta = torch.tensor(x, dtype=torch.float64), torch.tensor(q, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    if not bool((x != 0).any()):
        return 0.0
    for _ in range(iterations):
        p = torch.sigmoid(beta * x)
        gradient, curvature = ((q - p) * x).sum() - ridge * beta, (p * (1 - p) * x * x).sum() + ridge
        beta = beta + gradient / curvature
    return float(beta)


def bradley_terry_loss(rewards: torch.Tensor, batch: PreferenceBatch) -> tuple[torch.Tensor, int]:
    """Summed loss over the batch's comparisons (rlhfkit.losses.bradley_terry_loss), and how many there are."""
    d = rewards[batch.chosen] - rewards[batch.rejected] - batch.margin
    ties = rewards[batch.tie_a] - rewards[batch.tie_b]
    return losses.bradley_terry_loss(d, batch.target, ties), d.numel() + batch.tie_a.numel()


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


def load_comparisons(paths, keep_ties: bool) -> list[PreferenceItem]:
    """Preference items of a file (or of several, one after another: e.g. simulated on-policy rankings beside
    people's), refusing a file that yields no comparison to learn from or measure."""
    items = []
    for path in paths if isinstance(paths, list) else [paths]:
        found = load_preference_items(path, keep_ties=keep_ties)
        if not any(item.pairs or item.ties for item in found):
            raise DataError(f"{path}: no comparisons: every ranking ties all its completions (or the annotators' "
                            "majorities do); a reward model learns from completions ranked apart"
                            + ("" if keep_ties else ", or from ties with keep_ties: true"))
        items += found
    return items


def train_reward_model(cfg: RewardConfig) -> dict[str, float]:
    """Train, normalise and save a reward model; returns the final held-out metrics (empty without eval_file).

    A run with checkpoints (`save_every`, or each epoch's end) resumes with `resume_from`, to the same weights and
    logged figures as an uninterrupted run."""
    return RewardTrainer(cfg).train()


class RewardTrainer:
    """One reward-model training on the run skeleton (rlhfkit.runs.Run), in phases: set-up (inputs, then the model,
    optimizer and batches), the held-out figures before, the optimizer steps (Bradley-Terry over each batch's
    comparisons), and `finish` (normalised on the training completions, saved, diagnosed)."""

    def __init__(self, cfg: RewardConfig):
        self.cfg = cfg
        self.run = run = Run(cfg)
        # Inputs first: a run refused for bad data or an unknown model leaves no output directory behind.
        self.train_items = load_comparisons(cfg.train_file, cfg.keep_ties)
        self.eval_items = load_comparisons(cfg.eval_file, keep_ties=False) if cfg.eval_file else []
        self.swaps = load_fact_swaps(cfg.fact_swap_file, cfg.facts_sheet) if cfg.fact_swap_file else []
        logger.info("%d training prompts with %d comparisons", len(self.train_items),
                    sum(len(i.pairs) + len(i.ties) for i in self.train_items))
        model = RewardModel.from_base(cfg.model, max_length=cfg.max_length)
        if cfg.retrieval is not None:  # saved with the model: wherever it scores, it reads prompts as it was trained
            model.retrieval = cfg.retrieval.model_dump(mode="json")
        run.open()
        self._build(model)
        self.before = run.resume()["before"] if run.resuming else self.evaluate()

    def _build(self, model: RewardModel) -> None:
        """LoRA (where enabled), the length term, optimizer, schedule and batches, prepared by accelerate."""
        cfg, accelerator = self.cfg, self.run.accelerator
        if cfg.lora.enabled:
            from peft import get_peft_model

            model.set_body(get_peft_model(model.body, lora_config(cfg.lora)))
            accelerator.register_save_state_pre_hook(save_trainable_only)
        model.to(self.run.device)
        model.train()
        self.unwrapped = model  # batches are tokenized by the model itself: the prepared one may be a DDP wrapper
        loader = DataLoader(self.train_items, batch_size=cfg.batch_size, shuffle=True,
                            collate_fn=lambda items: collate_items(items, model, cfg.soft_labels))
        self.beta = fit_length_coefficient(self.train_items, cfg.soft_labels) if cfg.length_debias else 0.0
        if cfg.length_debias:
            logger.info("length term: beta %.4f per 10 words (fitted on the training pairs, left out of the saved "
                        "model)", self.beta)
        self.model, self.optimizer, self.scheduler, self.params, self.schedule = self.run.prepare_epochs(model, loader)

    def evaluate(self) -> dict[str, float]:
        """Accuracy, mean margin and calibration on the held-out pairs, logged as eval/*."""
        if not self.eval_items:
            return {}
        result = preference_metrics(pair_margins(self.unwrapped, self.eval_items, self.cfg.eval_batch_size))
        self.run.log({f"eval/{k}": v for k, v in result.items()})
        return result

    def train(self) -> dict[str, float]:
        cfg, run, schedule = self.cfg, self.run, self.schedule
        self.progress = tqdm(total=schedule.total, initial=run.step, desc="reward",
                             disable=not run.accelerator.is_local_main_process)
        for group in schedule.groups(run):
            self.step(group)
            self.progress.update(1)
            if run.step % cfg.log_every == 0 or run.step == schedule.total:
                self.log_train()
            if schedule.due(cfg.save_every, run.step) and run.step < schedule.total:
                run.save_checkpoint({"before": self.before})
        self.progress.close()
        return self.finish()

    def step(self, group: list[PreferenceBatch]) -> None:
        """One optimizer step over the micro-batches of `group`: the loss is the mean over every comparison of the
        step, on every process (DDP averages gradients across processes, hence the factor num_processes)."""
        run, accelerator = self.run, self.run.accelerator
        seed_step(self.cfg.seed, run.step)
        n_local = sum(b.chosen.numel() + b.tie_a.numel() for b in group)
        total_pairs = accelerator.reduce(torch.tensor(n_local, device=run.device), "sum").clamp(min=1)
        sums = torch.zeros(3, device=run.device)  # loss, comparisons, correctly ordered pairs
        for i, batch in enumerate(group):
            batch = batch.to(run.device)
            with nullcontext() if i == len(group) - 1 else accelerator.no_sync(self.model):
                rewards = self.model(batch.input_ids, batch.attention_mask)
                if self.beta:
                    rewards = rewards + self.beta * batch.lengths  # the length expert of length_debias
                loss_sum, n_pairs = bradley_terry_loss(rewards, batch)
                accelerator.backward(loss_sum * accelerator.num_processes / total_pairs)
            correct = (rewards[batch.chosen] > rewards[batch.rejected]).sum()
            sums += torch.stack([loss_sum.detach(), torch.tensor(float(n_pairs), device=run.device), correct.float()])
        if run.update(self.optimizer, self.scheduler, self.params, sums[0]).ok:
            run.window.add(dict(zip(("loss", "pairs", "correct"), accelerator.reduce(sums, "sum").tolist())))

    def log_train(self) -> None:
        """The mean loss and accuracy over the comparisons since the last log (skipped updates left out)."""
        sums = self.run.window.take()
        pairs = max(sums.get("pairs", 0.0), 1)
        values = {"train/loss": sums.get("loss", 0.0) / pairs, "train/accuracy": sums.get("correct", 0.0) / pairs,
                  "train/lr": self.scheduler.get_last_lr()[0]}
        if self.cfg.length_debias:
            values["train/length_beta"] = self.beta
        self.run.log(values)
        self.progress.set_postfix(loss=f"{values['train/loss']:.4f}", acc=f"{values['train/accuracy']:.2f}")

    def finish(self) -> dict[str, float]:
        """Merge LoRA, normalise the scores on the training completions (std 1 there, and mean 0 where the head has
        a bias), the held-out figures after, then the model and its diagnostics (rankings: best-of-K, Kendall's tau,
        length bias, the annotators' own agreement; fact swaps)."""
        cfg, run = self.cfg, self.run
        final = run.accelerator.unwrap_model(self.model)
        if cfg.lora.enabled:
            final.set_body(final.body.merge_and_unload())
        final.set_normalization(torch.cat([final.raw_scores([it.prompt] * len(it.completions), it.completions,
                                                            cfg.eval_batch_size) for it in self.train_items]))
        after = self.evaluate()
        if run.accelerator.is_main_process:
            tmp = cfg.output_dir / ".final.tmp"
            final.save_pretrained(tmp)
            install_files(tmp, cfg.output_dir, last=("config.json",))
            diagnose_reward_model(final, cfg.eval_file, cfg.eval_batch_size, cfg.output_dir, self.swaps,
                                  ranking_counts(cfg.train_file))
        run.close()
        return {"before_" + k: v for k, v in self.before.items()} | after
