"""Direct preference optimisation: the policy learns from preference pairs directly, with no reward model and no
sampling. For a prompt x with a preferred response y_w and a dispreferred one y_l:

    h = [log pi_theta(y_w|x) - log pi_ref(y_w|x)] - [log pi_theta(y_l|x) - log pi_ref(y_l|x)]

- Rafailov et al. 2023 (DPO):  L = -log sigma(beta h). The implicit reward of a response is
  r(x, y) = beta [log pi_theta(y|x) - log pi_ref(y|x)]; sigma(r_w - r_l) = sigma(beta h) is the model's
  Bradley-Terry probability that y_w is preferred.
- Mitchell 2023 (cDPO, label smoothing eps: a label is wrong with probability eps):
  L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
- Azar et al. 2023 (IPO, beta the paper's tau):  L = (h - 1/(2 beta))^2, which regresses h onto a fixed margin
  instead of pushing it to infinity. By default (`ipo_length_normalize`) each completion's log-ratio is divided by
  its number of tokens first, h = [log-ratio(y_w)] / |y_w| - [log-ratio(y_l)] / |y_l|: what TRL 1.16 does, and the
  form the IPO authors' results were obtained with (summed log-ratios make the loss grow with length, so that one
  beta suits no length); `ipo_length_normalize: false` keeps the sums.
- Soft labels: a pair whose vote share is q (2 of 3 annotators preferred y_w: q = 2/3) is the expectation of the
  loss over its label, q L(y_w, y_l) + (1 - q) L(y_l, y_w). With q = 1 - eps this is cDPO; the same expectation
  gives IPO its label smoothing and soft labels. Its optimum is sigma(beta h) = q (DPO) and h = (2q - 1)/(2 beta)
  (IPO), so a model trained on vote shares is asked for calibrated probabilities, not certainty. (TRL 1.16's
  `loss_type="sigmoid"` and `"ipo"` ignore its `label_smoothing`: it applies it only to other losses, e.g.
  `"robust"`, whose loss is cDPO's divided by 1 - 2 eps, an unbiased estimate rather than the expectation.)

log pi(y|x) is summed over the response's tokens only (its end-of-turn token included); the prompt's tokens and
padding count for nothing. The reference is the starting model: its log-probs are computed once, before the first
update (with LoRA, through the policy with its adapter disabled; without, from the starting weights themselves, so
no frozen copy is kept), cached, and saved in each checkpoint for an exact resume.

Data: rankings (consolidated by annotator majority, as reward training does) or pairs; each prompt's distinct
completions go through the model once per step and all its pairs are formed from those log-probs. Built on
`accelerate.Accelerator` as SFT is: the loss of an optimizer step is the mean over every pair in that step (all
micro-batches of the gradient accumulation, all processes).

A run (`DPOTrainer`; `train_dpo(cfg)` builds one and trains it) goes through these phases, each a method:
  1. set-up     `__init__`: the train and eval items tokenized, then the output directory, and `_build_model`: the
                policy (dropout off), optimizer, LR schedule and batches, prepared by accelerate;
  2. reference  log pi_ref of every train and eval sequence, once: from the starting model (`_compute_reference`),
                or when resuming from the checkpoint (`_load_reference`, then `_resume`: weights, optimizer,
                schedule, step);
  3. evaluate   the held-out figures: at step 0 from log pi_ref alone (`evaluate_reference`), then every
                `eval_every` steps or each epoch's end (`evaluate`);
  4. train      `train` runs the optimizer steps (rlhfkit.runs.EpochSchedule: a resumed epoch skips what it did)
                (`step`: each micro-batch's pair losses and backward in `micro_batch`, then the update); after each,
                `after_step` logs (`log_train`), evaluates and saves (`save_checkpoint`) where their schedules fall;
  5. finish     `finish`: the final held-out figures, the last checkpoint and the model (adapter or full weights).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from rlhfkit.config import DPOConfig
from rlhfkit.data.chat import IGNORE_INDEX, TokenizedExample, as_messages, prompt_text, tokenize_conversation
from rlhfkit.data.records import Message
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.losses import preference_loss
from rlhfkit.models.loading import disable_dropout, load_tokenizer
from rlhfkit.models.policy import PolicyModel, trainable_start_model
from rlhfkit.reward.train import load_comparisons, preference_metrics
from rlhfkit.runs import Run, save_final_model, save_trainable_only, seed_step

logger = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.safetensors"  # in each checkpoint: log pi_ref of every train and eval sequence


# --- log-probabilities ------------------------------------------------------------------------------------------


def sequence_logps(policy: PolicyModel, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) over each row's response tokens, [B].

    Through the online trainer's policy forward: a prompt shared by several rows (a prompt's completions) and the
    prefix all prompts share are computed once, and vocabulary logits only where they predict a response token.
    """
    logits, _ = policy(query_ids, query_mask, response_ids, response_mask)
    targets = response_ids.masked_fill(response_mask == 0, IGNORE_INDEX)
    token_logps = -F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="none")  # 0 where masked
    return token_logps.view_as(targets).sum(-1)


# --- data -------------------------------------------------------------------------------------------------------


@dataclass
class TokenizedItem:
    """One prompt's distinct completions, each tokenized with the prompt (labels on the completion), and its pairs."""

    sequences: list[TokenizedExample]
    pairs: list[tuple[int, int]]  # (y_w, y_l) as indices into `sequences`
    targets: list[float]  # P(y_w preferred) per pair: 1, or the annotators' vote share with soft_labels
    offset: int = 0  # index of its first sequence in the run's flat list of sequences (the reference cache)


@dataclass
class DPOBatch:
    """The completions of several prompts as one batch (prompts left-padded, responses right-padded), and their
    pairs as row indices."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    sequence_ids: torch.Tensor  # [S] each row's index in the flat list of sequences (its cached log pi_ref)
    chosen: torch.Tensor  # [N] the row of y_w of each pair
    rejected: torch.Tensor  # [N] the row of y_l
    target: torch.Tensor  # [N] P(y_w preferred)

    def to(self, device) -> DPOBatch:
        return DPOBatch(**{k: v.to(device) for k, v in self.__dict__.items()})

    def tokens(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("query_ids", "query_mask", "response_ids", "response_mask")}


def collate_sequences(sequences: list[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Tokenized conversations as the policy's forward takes them: each cut before its first labelled token into
    a prompt (left-padded) and a response (right-padded, mask 1 on its labelled tokens)."""
    starts = [next((i for i, t in enumerate(e.labels) if t != IGNORE_INDEX), len(e.labels)) for e in sequences]
    prompt_width = max(starts)
    response_width = max(len(e.input_ids) - k for e, k in zip(sequences, starts))
    out = {"query_ids": torch.full((len(sequences), prompt_width), pad_id, dtype=torch.long),
           "query_mask": torch.zeros((len(sequences), prompt_width), dtype=torch.long),
           "response_ids": torch.full((len(sequences), response_width), pad_id, dtype=torch.long),
           "response_mask": torch.zeros((len(sequences), response_width), dtype=torch.long)}
    for i, (e, k) in enumerate(zip(sequences, starts)):
        out["query_ids"][i, prompt_width - k:] = torch.tensor(e.input_ids[:k])
        out["query_mask"][i, prompt_width - k:] = 1
        n = len(e.input_ids) - k
        out["response_ids"][i, :n] = torch.tensor(e.input_ids[k:])
        out["response_mask"][i, :n] = torch.tensor([int(t != IGNORE_INDEX) for t in e.labels[k:]])
    return out


def tokenize_items(path: Path, tokenizer, max_length: int, system_prompt: str | None,
                   soft_labels: bool) -> list[TokenizedItem]:
    """The preference items of `path` (rankings consolidated by majority, or pairs), tokenized through the model's
    chat template as SFT does. A pair with a completion left without a token by `max_length` is dropped."""
    items, dropped = [], 0
    for item in load_comparisons(path, keep_ties=False):
        sequences = []
        for completion in item.completions:
            messages = [Message.model_validate(m) for m in as_messages(item.prompt, system_prompt)]
            messages.append(Message(role="assistant", content=completion))
            try:
                sequences.append(tokenize_conversation(tokenizer, messages, max_length))
            except Exception as e:  # jinja raises its own types (a template that refuses a role, a missing key)
                raise DataError(f"{path}: prompt {prompt_text(item.prompt)[:60]!r}: the model's chat template cannot "
                                f"render it ({e})") from None
        kept = [(pair, share if soft_labels else 1.0) for pair, share in zip(item.pairs, item.shares)
                if all(sequences[i].num_target_tokens for i in pair)]
        dropped += len(item.pairs) - len(kept)
        if kept:
            items.append(TokenizedItem(sequences, [p for p, _ in kept], [q for _, q in kept]))
    if not items:
        raise DataError(f"{path}: no pair has a response token within max_length={max_length}")
    if dropped:
        logger.warning("%s: %d pairs have a completion with no token within max_length and are skipped", path, dropped)
    offset = 0
    for item in items:
        item.offset, offset = offset, offset + len(item.sequences)
    return items


def collate_items(items: list[TokenizedItem], pad_id: int) -> DPOBatch:
    sequences, ids, chosen, rejected, target = [], [], [], [], []
    for item in items:
        row = len(sequences)
        sequences += item.sequences
        ids += range(item.offset, item.offset + len(item.sequences))
        chosen += [row + w for w, _ in item.pairs]
        rejected += [row + l for _, l in item.pairs]
        target += item.targets
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return DPOBatch(**collate_sequences(sequences, pad_id), sequence_ids=as_long(ids), chosen=as_long(chosen),
                    rejected=as_long(rejected), target=torch.tensor(target, dtype=torch.float32))


@torch.no_grad()
def all_sequence_logps(policy: PolicyModel, items: list[TokenizedItem], batch_size: int, pad_id: int,
                       accelerator: Accelerator) -> torch.Tensor:
    """log pi(y|x) of every sequence of `items` in their flat order, in eval mode under the run's autocast."""
    sequences = [s for item in items for s in item.sequences]
    was_training = policy.training
    policy.eval()
    out = []
    with accelerator.autocast():
        for start in range(0, len(sequences), batch_size):
            part = collate_sequences(sequences[start:start + batch_size], pad_id)
            out.append(sequence_logps(policy, **{k: v.to(accelerator.device) for k, v in part.items()}).float())
    policy.train(was_training)
    return torch.cat(out)


def reference_logps(policy: PolicyModel, items: list[TokenizedItem], batch_size: int, pad_id: int,
                    accelerator: Accelerator, lora: bool) -> torch.Tensor:
    """log pi_ref(y|x) of every sequence: the starting model, i.e. (LoRA) the policy with its adapter switched
    off, or (full fine-tuning) the policy before its first update."""
    with policy.as_reference() if lora else nullcontext():
        return all_sequence_logps(policy, items, batch_size, pad_id, accelerator)


# --- metrics ----------------------------------------------------------------------------------------------------

PAIR_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
              "logps/rejected")  # TRL's names
WINDOW = (*PAIR_STATS, "pairs")  # pair_stat_sums: the sums of PAIR_STATS over pairs, then the number of pairs


def pair_stat_sums(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> torch.Tensor:
    """Sums over pairs of each of PAIR_STATS, then the number of pairs: summed over steps and processes, divided
    at the end."""
    return torch.stack([losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).float().sum(), (chosen_rewards - rejected_rewards).sum(),
                        policy_chosen.detach().sum(), policy_rejected.detach().sum(),
                        torch.tensor(float(losses.numel()), device=losses.device)]).float()


def mean_stats(sums: torch.Tensor) -> dict[str, float]:
    n = max(sums[-1].item(), 1.0)
    return {name: value / n for name, value in zip(PAIR_STATS, sums[:-1].tolist())}


def pairs_of(items: list[TokenizedItem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y_w, y_l, q) of every pair of `items`, y_w and y_l as indices into their flat list of sequences."""
    chosen = [item.offset + w for item in items for w, _ in item.pairs]
    rejected = [item.offset + l for item in items for _, l in item.pairs]
    return torch.tensor(chosen), torch.tensor(rejected), torch.tensor([q for item in items for q in item.targets])


def pair_losses(cfg: DPOConfig, policy: torch.Tensor, reference: torch.Tensor, lengths: torch.Tensor,
                chosen: torch.Tensor, rejected: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`preference_loss` as the run is configured, from [S] sequence log-probs and response lengths in tokens and
    the rows of each pair's y_w and y_l."""
    per_token = cfg.loss == "ipo" and cfg.ipo_length_normalize
    return preference_loss(policy[chosen], policy[rejected], reference[chosen], reference[rejected], cfg.beta,
                           cfg.loss, cfg.label_smoothing, target,
                           (lengths[chosen], lengths[rejected]) if per_token else None)


def held_out_metrics(policy: torch.Tensor, reference: torch.Tensor, items: list[TokenizedItem],
                     cfg: DPOConfig) -> dict[str, float]:
    """PAIR_STATS over the held-out pairs, and the calibration error of sigma(r_w - r_l) as a probability that y_w
    is preferred (the reward model's measure)."""
    w, l, q = (t.to(policy.device) for t in pairs_of(items))
    lengths = torch.tensor([float(s.num_target_tokens) for item in items for s in item.sequences], device=policy.device)
    losses, rw, rl = pair_losses(cfg, policy, reference, lengths, w, l, q)
    values = mean_stats(pair_stat_sums(losses, rw, rl, policy[w], policy[l]))
    values["calibration_error"] = preference_metrics((rw - rl).cpu())["calibration_error"]
    return values


# --- training ---------------------------------------------------------------------------------------------------


@dataclass
class DPOResult:
    output_dir: Path
    steps: int
    train_loss_first: float | None = None  # mean loss of the first logged window
    train_loss_last: float | None = None
    eval_before: dict[str, float] = field(default_factory=dict)  # held-out PAIR_STATS at the start (the reference)
    eval_after: dict[str, float] = field(default_factory=dict)


class DPOTrainer:
    """The data, model, optimizer and reference log-probs of one run on the run skeleton (rlhfkit.runs.Run), and its
    phases (see the module docstring)."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.run = run = Run(cfg)
        self.accelerator, self.device = run.accelerator, run.device
        # Inputs first: a run refused for bad data or an unknown model leaves no output directory behind.
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.train_items = self._tokenize(cfg.train_file)
        self.eval_items = self._tokenize(cfg.eval_file) if cfg.eval_file else []
        logger.info("%d training prompts with %d pairs", len(self.train_items),
                    sum(len(i.pairs) for i in self.train_items))
        run.open()
        self._build_model()
        # log pi_ref, once: from the checkpoint when resuming (the policy has moved since), else the starting model.
        self.reference = self._load_reference() if run.resuming else self._compute_reference()
        self.result = DPOResult(output_dir=cfg.output_dir, steps=0)
        self.evaluated_at: int | None = None  # the step of the latest held-out figures
        if run.resuming:
            self._resume()

    # --- set-up --------------------------------------------------------------------------------------------------

    def _tokenize(self, path: Path) -> list[TokenizedItem]:
        cfg = self.cfg
        return tokenize_items(path, self.tokenizer, cfg.max_length, cfg.system_prompt, cfg.soft_labels)

    def _build_model(self) -> None:
        """The policy (dropout off), its optimizer, LR schedule and training batches, prepared by accelerate."""
        cfg, accelerator = self.cfg, self.accelerator
        model = PolicyModel(trainable_start_model(cfg))
        # No dropout: the policy's log-probs must be comparable with the reference's, computed once without it.
        disable_dropout(model)
        if cfg.lora.enabled:
            accelerator.register_save_state_pre_hook(save_trainable_only)
        model.to(self.device)
        pad_id = self.pad_id
        train_dl = DataLoader(self.train_items, batch_size=cfg.batch_size, shuffle=True,
                              collate_fn=lambda items: collate_items(items, pad_id))
        self.model, self.optimizer, self.scheduler, self.params, self.schedule = self.run.prepare_epochs(model, train_dl)
        self.unwrapped = accelerator.unwrap_model(self.model)

    def _compute_reference(self) -> dict[str, torch.Tensor]:
        """log pi_ref of every train and eval sequence, from the starting model (before any update)."""
        cfg = self.cfg
        return {name: reference_logps(self.unwrapped, items, cfg.eval_batch_size, self.pad_id, self.accelerator,
                                      cfg.lora.enabled) if items else torch.zeros(0, device=self.device)
                for name, items in (("train", self.train_items), ("eval", self.eval_items))}

    def _load_reference(self) -> dict[str, torch.Tensor]:
        """log pi_ref as the checkpoint saved it, refused if it is for other data than this run's."""
        checkpoint = self.run.checkpoint
        reference = {k: v.to(self.device) for k, v in load_file(checkpoint / REFERENCE_FILE).items()}
        if reference["train"].numel() != sum(len(i.sequences) for i in self.train_items) or \
                reference["eval"].numel() != sum(len(i.sequences) for i in self.eval_items):
            raise ConfigError(f"resume_from={checkpoint}: its reference log-probs are for other train_file or "
                              "eval_file data than this run's")
        return reference

    def _resume(self) -> None:
        """Weights, optimizer, schedule, RNG, step and metrics window from the checkpoint (`Run.resume`); the figures
        of the run's start."""
        state = self.run.resume()
        self.result.train_loss_first = state.get("train_loss_first")
        self.result.eval_before = state.get("eval_before", {})

    def save_checkpoint(self) -> None:
        """The run's checkpoint (`Run.save_checkpoint`) with log pi_ref (REFERENCE_FILE) and the start's figures."""
        def write_reference(directory: Path) -> None:
            save_file({k: v.contiguous().cpu() for k, v in self.reference.items()}, directory / REFERENCE_FILE)

        self.run.save_checkpoint({"train_loss_first": self.result.train_loss_first,
                                  "eval_before": self.result.eval_before}, write_reference)

    # --- evaluation and logging ---------------------------------------------------------------------------------

    def evaluate_reference(self) -> None:
        """The held-out figures at step 0: before any update the policy is the reference, so they need no forward."""
        reference = self.reference["eval"]
        self.result.eval_before = held_out_metrics(reference, reference, self.eval_items, self.cfg)
        self.run.log({f"eval/{k}": v for k, v in self.result.eval_before.items()})

    def evaluate(self) -> None:
        """The held-out figures of the policy now (`held_out_metrics`), logged as eval/*."""
        policy = all_sequence_logps(self.unwrapped, self.eval_items, self.cfg.eval_batch_size, self.pad_id,
                                    self.accelerator)
        self.result.eval_after = held_out_metrics(policy, self.reference["eval"], self.eval_items, self.cfg)
        self.run.log({f"eval/{k}": v for k, v in self.result.eval_after.items()})
        self.evaluated_at = self.run.step

    def log_train(self, grad_norm: float) -> None:
        """The mean PAIR_STATS of the steps since the last log (skipped updates left out), then a fresh window."""
        sums = self.run.window.take()
        values = {("train/loss" if k == "loss" else k): v
                  for k, v in mean_stats(torch.tensor([sums.get(k, 0.0) for k in WINDOW], dtype=torch.float64)).items()}
        self.result.train_loss_first = self.result.train_loss_first or values["train/loss"]
        self.result.train_loss_last = values["train/loss"]
        self.run.log(values | {"train/lr": self.scheduler.get_last_lr()[0], "train/grad_norm": grad_norm,
                               "train/epoch": self.run.step / self.schedule.steps_per_epoch})
        self.progress.set_postfix(loss=f"{values['train/loss']:.4f}", acc=f"{values['rewards/accuracies']:.2f}")

    # --- training -----------------------------------------------------------------------------------------------

    def train(self) -> DPOResult:
        """The held-out figures of the start (a fresh run), the optimizer steps (resuming mid-epoch skips what was
        trained on), then `finish`."""
        if not self.run.resuming and self.eval_items:
            self.evaluate_reference()
        self.progress = tqdm(total=self.schedule.total, initial=self.run.step, desc="dpo",
                             disable=not self.accelerator.is_local_main_process)
        self.model.train()
        for group in self.schedule.groups(self.run):
            self.after_step(self.step(group))
        self.progress.close()
        return self.finish()

    def step(self, group: list[DPOBatch]) -> float:
        """One optimizer step over the micro-batches of `group`; a NaN/Inf loss skips the update (and counts against
        `max_nonfinite_updates`). Returns the gradient norm."""
        accelerator = self.accelerator
        seed_step(self.cfg.seed, self.run.step)
        # Normaliser: pairs in the whole optimizer step, over all processes (DDP averages gradients across
        # processes, hence the factor num_processes).
        n_pairs = accelerator.reduce(torch.tensor(sum(b.chosen.numel() for b in group), device=self.device),
                                     "sum").clamp(min=1)
        step_sums = torch.zeros(len(WINDOW), device=self.device)
        for i, batch in enumerate(group):
            step_sums += self.micro_batch(batch.to(self.device), n_pairs, sync=i == len(group) - 1)
        outcome = self.run.update(self.optimizer, self.scheduler, self.params, step_sums[0])
        self.progress.update(1)
        if outcome.ok:
            self.run.window.add(dict(zip(WINDOW, accelerator.reduce(step_sums, "sum").tolist())))
        return outcome.grad_norm

    def micro_batch(self, batch: DPOBatch, n_pairs: torch.Tensor, sync: bool) -> torch.Tensor:
        """The pair losses of one micro-batch, backward as their share of the step's mean (gradients synchronised
        across processes on the step's last micro-batch only); returns their pair_stat_sums."""
        cfg = self.cfg
        with nullcontext() if sync else self.accelerator.no_sync(self.model):
            policy = sequence_logps(self.model, **batch.tokens())
            ref = self.reference["train"][batch.sequence_ids]
            losses, rw, rl = pair_losses(cfg, policy, ref, batch.response_mask.sum(-1).float(), batch.chosen,
                                         batch.rejected, batch.target)
            self.accelerator.backward(losses.sum() * self.accelerator.num_processes / n_pairs)
        return pair_stat_sums(losses, rw, rl, policy[batch.chosen], policy[batch.rejected])

    def after_step(self, grad_norm: float) -> None:
        """Log, evaluate and save where their schedules fall (each `*_every` steps, else at each epoch's end); the
        last step's checkpoint is `finish`'s."""
        cfg, step, schedule = self.cfg, self.run.step, self.schedule
        if step % cfg.log_every == 0 or schedule.end_of_epoch(step):
            self.log_train(grad_norm)
        if self.eval_items and schedule.due(cfg.eval_every, step):
            self.evaluate()
        if schedule.due(cfg.save_every, step) and step < schedule.total:
            self.save_checkpoint()

    def finish(self) -> DPOResult:
        """The final held-out figures (where the last step was not evaluated), the last checkpoint, the model."""
        if self.eval_items and self.evaluated_at != self.run.step:
            self.evaluate()
        self.result.steps = self.run.step
        self.save_checkpoint()
        save_final_model(self.unwrapped.lm, self.tokenizer, self.cfg.output_dir, self.accelerator,
                         adapter=self.cfg.lora.enabled, merge=self.cfg.merge_adapter)
        self.run.close()
        return self.result


def train_dpo(cfg: DPOConfig) -> DPOResult:
    """Train a policy by DPO as `cfg` says (resuming where it names a checkpoint); see `DPOTrainer`."""
    return DPOTrainer(cfg).train()
