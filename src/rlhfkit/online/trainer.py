"""Online policy optimisation of a language model against rewards, with a KL penalty against the frozen starting
model: PPO, RLOO or GRPO, one trainer whose algorithm is a setting (`algorithm`; the math is in rlhfkit.online.core and
rlhfkit.losses).

One iteration (`OnlineTrainer.step`) runs these phases, each a method of the trainer:
  1. rollout     the engine (rlhfkit.rollout) samples K = sampling.num_samples responses per prompt (1 for PPO),
                 recording log pi_old(a_t), the entropy and, with a value head, V_old(s_t) while it samples (or a
                 vLLM server does, the policy pushed to it first: `sampling.backend: vllm`, docs/scale.md);
  2. score       the decoded text is scored by every reward (so reward models with another tokenizer work too);
                 the EOS penalty, normalisation and clipping give the score s the policy maximises;
  3. reference   no-grad forwards: log pi_ref (the policy with its adapter off, or a frozen copy), a separate
                 critic's V_old, and log pi_old again only when `recompute_logprobs` is set; with k3 under top-p/top-k,
                 also the reference's mass outside the tokens the policy keeps (k3's correction, rlhfkit.online.core);
  4. advantages  the algorithm's: ppo  GAE over r_t = -beta * KL_t (+ s on the last token) and the critic's values;
                 rloo  R_i = s_i - beta * KL_i minus the mean R of the prompt's other samples;
                 grpo  (s_i - mean) / std over the prompt's samples (Dr. GRPO: without the std);
  5. update      `ppo_epochs` passes over shuffled minibatches: clipped ratio loss per token (+ vf_coef * clipped
                 value loss for ppo, + beta * k3 to the reference for grpo), weighed by `loss_aggregation` over the
                 minibatch's tokens on every process, one optimizer step each.
Around them: checkpoints and resume, the NaN/Inf guard, and metrics (`step` returns them). The first minibatch's
forward also measures how far its log-probs are from those the sampler recorded (`rollout/logprob_gap_*`): the
same numbers computed twice, 0 up to float error in float32.

Built on accelerate: one process here, `accelerate launch` / torchrun for several. Each process rolls out its
own `batch_size` responses; statistics that normalise (advantage whitening, token counts) are global.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlhfkit.config import PPOConfig
from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.data.records import load_prompts
from rlhfkit import losses
from rlhfkit.errors import NonFiniteError, RlhfkitError
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.online import core
from rlhfkit.online.networks import build_critic, build_policy
from rlhfkit.retrieval import Grounding
from rlhfkit.reward.scorers import Reward, RewardModelReward, WeightedSum, load_scorer
from rlhfkit.rollout import Rollout, dropped_mass, encode_prompts, generate_responses, sample, token_logprobs
from rlhfkit.rollout.prefix import forward_responses
from rlhfkit.rollout.vllm_backend import check_gap
from rlhfkit.runs import Run, adamw, optimizer_step, save_final_model, save_trainable_only

logger = logging.getLogger(__name__)


STAT_NAMES = ("pg", "vf", "kl", "clipfrac", "vf_clipfrac", "approx_kl", "outside_support", "tokens")

__all__ = ["NonFiniteError", "OnlineTrainer", "PPOResult", "train_ppo"]


@dataclass
class PPOResult:
    output_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)  # the metrics of every logged step
    previews: list[dict] = field(default_factory=list)  # {"prompt", "before", "after", "scores_before", "scores_after"}


@dataclass
class Scores:
    components: dict[str, torch.Tensor]  # each reward's raw score, [B]
    raw: torch.Tensor  # their weighted sum
    shaped: torch.Tensor  # after the EOS penalty, normalisation and clipping: what the policy maximises


@dataclass
class Targets:
    """What the update regresses on, fixed for the iteration."""

    old_logprobs: torch.Tensor  # [B, R] log pi_old(a_t)
    ref_logprobs: torch.Tensor  # [B, R] log pi_ref(a_t)
    ref_dropped: torch.Tensor  # [B, R] 1 - pi_ref(S_t): the reference's mass outside pi_old's support (0 untruncated)
    kl: torch.Tensor  # [B, R] KL_t estimate to the reference
    token_rewards: torch.Tensor  # [B, R]
    advantages: torch.Tensor  # [B, R]
    old_values: torch.Tensor | None = None  # [B, R] V_old(s_t)
    returns: torch.Tensor | None = None  # [B, R]


def build_reward(cfg: PPOConfig, device) -> tuple[WeightedSum, str | None]:
    """The weighted sum of the configured rewards, and the first reward-model directory among them."""
    terms, reward_model_path = [], None
    for term in cfg.rewards:
        scorer = load_scorer(term.scorer, device=device)
        if term.name:
            scorer.name = term.name
        if isinstance(scorer, RewardModelReward) and reward_model_path is None:
            reward_model_path = term.scorer
        terms.append((term.weight, scorer))
    names = [s.name for _, s in terms]
    if len(set(names)) != len(names):
        raise RlhfkitError(f"two rewards share a name ({names}); give them distinct `name:` settings")
    return WeightedSum(terms), reward_model_path


def prompt_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order prompts are visited in during one pass over them; fixed by (seed, epoch), so resumable."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_prompt_indices(n: int, seed: int, step: int, batch_size: int, rank: int, world: int) -> list[int]:
    """Which prompts process `rank` rolls out at iteration `step`: consecutive slices of the epoch orders."""
    start = (step * world + rank) * batch_size
    indices = []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, n)
        indices.append(int(prompt_order(n, seed, epoch)[offset]))
    return indices


def train_ppo(cfg: PPOConfig, rewards: Reward | None = None) -> PPOResult:
    """Run PPO as configured. `rewards` (e.g. a `FunctionReward`) replaces `cfg.rewards` for library use."""
    return OnlineTrainer(cfg, rewards).train()


class OnlineTrainer:
    """The models, optimizer and state of one run, and the phases of an iteration (see the module docstring)."""

    def __init__(self, cfg: PPOConfig, rewards: Reward | None = None):
        self.cfg = cfg
        self.run = run = Run(cfg)  # the run skeleton: its step counts iterations
        self.accelerator = run.accelerator
        self.device = run.device
        # Inputs first: a run refused for bad data, rewards or model name leaves no output directory behind.
        self.tokenizer = load_tokenizer(cfg.model)
        self.prompts = [r.prompt for r in load_prompts(cfg.prompts_file)]
        self.preview_prompts = self._preview_prompts()
        self.grounding = Grounding.from_settings(cfg.retrieval, str(self.device))  # passages in every rollout's prompt
        if rewards is None:
            self.reward, reward_model_path = build_reward(cfg, self.device)
        else:
            self.reward = rewards if isinstance(rewards, WeightedSum) else WeightedSum([(1.0, rewards)])
            reward_model_path = None
        self.vllm = self._vllm_sampler()  # before run.open(): no server, no output directory left behind
        run.open()
        self.sampling = cfg.sampling.distribution()
        self._build_models(reward_model_path)
        self.kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                       if cfg.kl_controller == "adaptive" else core.FixedKLController(cfg.kl_coef))
        self.moments = core.RunningMoments()
        if run.resuming:
            self._resume()

    # --- set-up --------------------------------------------------------------------------------------------------

    def _preview_prompts(self) -> list[str]:
        cfg = self.cfg
        if not cfg.preview.num_prompts:
            return []
        source = [r.prompt for r in load_prompts(cfg.eval_prompts_file)] if cfg.eval_prompts_file else self.prompts
        return source[:: max(1, len(source) // cfg.preview.num_prompts)][: cfg.preview.num_prompts]

    def _build_models(self, reward_model_path: str | None) -> None:
        """Policy (and value head), reference, critic, optimizer and scheduler, prepared by accelerate."""
        cfg, accelerator = self.cfg, self.accelerator
        policy, self.ref_model = build_policy(cfg)
        critic = build_critic(cfg, self.tokenizer, reward_model_path) if cfg.critic == "separate" else None
        self.stop_ids = cfg.sampling.stop_ids(self.tokenizer, policy.lm)
        policy.to(self.device)
        if self.ref_model is not None:
            self.ref_model.to(self.device)
        if critic is not None:
            critic.to(self.device)
        if cfg.lora.enabled:
            accelerator.register_save_state_pre_hook(save_trainable_only)
        policy_params = [p for p in policy.parameters() if p.requires_grad]
        critic_params = [p for p in critic.parameters() if p.requires_grad] if critic is not None else []
        groups = [{"params": policy_params, "lr": cfg.learning_rate}]
        if critic_params:
            groups.append({"params": critic_params, "lr": cfg.critic_learning_rate or cfg.learning_rate})
        optimizer = adamw(groups, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        if critic is not None:
            self.policy, self.critic, self.optimizer = accelerator.prepare(policy, critic, optimizer)
        else:
            (self.policy, self.optimizer), self.critic = accelerator.prepare(policy, optimizer), None
        self.trained = [m for m in (self.policy, self.critic) if m is not None]
        self.params = policy_params + critic_params
        total_updates = cfg.steps * cfg.ppo_epochs * (cfg.batch_size // cfg.mini_batch_size)
        self.scheduler = get_scheduler(cfg.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(cfg.warmup_ratio * total_updates),
                                       num_training_steps=total_updates)
        accelerator.register_for_checkpointing(self.scheduler)  # stepped by us, once per optimizer step

    def _vllm_sampler(self):
        """The vLLM server's client (`sampling.backend: vllm`), checked to answer now; None for the engine."""
        if self.cfg.sampling.backend != "vllm":
            return None
        from rlhfkit.rollout.vllm_backend import connect

        return connect(self.cfg.sampling, self.cfg.output_dir / "vllm-sync", self.cfg.model, self.cfg.lora.r)

    def _resume(self) -> None:
        """Models, optimizer, schedule, RNG and the iteration from the checkpoint (`Run.resume`); the KL controller
        and the reward normalisation's running moments."""
        state = self.run.resume()
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.moments.load_state_dict(state["reward_moments"])

    def save_checkpoint(self) -> None:
        self.run.save_checkpoint({"kl_controller": self.kl_ctl.state_dict(), "reward_moments": self.moments.state_dict()})

    # --- helpers shared by the phases ---------------------------------------------------------------------------

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, "sum")

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(x.contiguous())

    def policy_logits(self, batch: Rollout, train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the policy's logits [B, R, V], V(s_t)) at the batch's response tokens, through the prepared (DDP) modules
        when training."""
        unwrap = self.accelerator.unwrap_model
        logits, values = (self.policy if train else unwrap(self.policy))(**batch.tokens())
        if self.critic is not None:
            values = (self.critic if train else unwrap(self.critic))(**batch.tokens())
        return logits, values

    def logprobs(self, logits: torch.Tensor, batch: Rollout) -> torch.Tensor:
        """log pi(a_t) under the sampling distribution; padding after the stop token may lie outside a truncated
        distribution's support (-inf): zero, as masked."""
        return token_logprobs(logits, batch.response_ids, self.sampling).masked_fill(batch.response_mask == 0, 0.0)

    def forward(self, batch: Rollout, train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log pi(a_t), V(s_t)) at the batch's response tokens."""
        logits, values = self.policy_logits(batch, train)
        return self.logprobs(logits, batch), values

    @torch.no_grad()
    def critic_values(self, batch: Rollout) -> torch.Tensor:
        return self.accelerator.unwrap_model(self.critic)(**batch.tokens())

    @torch.no_grad()
    def reference_logits(self, batch: Rollout) -> torch.Tensor:
        """The reference's logits at the batch's response tokens."""
        if self.ref_model is not None:
            (logits,) = forward_responses(self.ref_model, select=lambda out: (out.logits,), **batch.tokens())
        else:
            policy = self.accelerator.unwrap_model(self.policy)
            with policy.as_reference():
                logits, _ = policy(**batch.tokens())
        return logits

    @property
    def k3_needs_kept_mass(self) -> bool:
        """Whether k3 is estimated (`kl_estimator: k3`, GRPO's loss term) under truncation, where its correction
        needs the reference's mass outside the policy's kept tokens (rlhfkit.online.core)."""
        return self.sampling.truncated and (self.cfg.kl_estimator == "k3" or self.cfg.algorithm == "grpo")

    def micro_batches(self, rows: torch.Tensor, size: int | None = None):
        """(last?, chunk) over `rows` in chunks of `size` (default: the training forward's micro-batch)."""
        size = size or self.cfg.micro_batch_size or self.cfg.mini_batch_size
        for start in range(0, len(rows), size):
            yield start + size >= len(rows), rows[start:start + size]

    # --- the phases ---------------------------------------------------------------------------------------------

    def rollout(self, prompts: list[str]) -> Rollout:
        """1. Sample responses with the policy (adapters folded), recording log pi_old, entropy and V_old."""
        query_ids, query_mask = encode_prompts(self.tokenizer, prompts, self.cfg.max_prompt_length,
                                               self.cfg.system_prompt, self.grounding)
        policy = self.accelerator.unwrap_model(self.policy)
        if self.vllm is not None:
            return self._vllm_rollout(policy.lm, query_ids, query_mask)
        with self.accelerator.autocast():
            return sample(policy.lm, query_ids.to(self.device), query_mask.to(self.device), self.sampling,
                          self.stop_ids, self.tokenizer.pad_token_id, value_head=policy.value_head,
                          compile=self.cfg.sampling.compile)

    def _vllm_rollout(self, lm, query_ids: torch.Tensor, query_mask: torch.Tensor) -> Rollout:
        """The vLLM server's samples, after the main process has pushed the policy as of this iteration's updates
        (rlhfkit.rollout.vllm_backend: a server sampling with another version stops the run)."""
        if self.accelerator.is_main_process:
            self.vllm.push(lm, self.run.step)
        self.accelerator.wait_for_everyone()
        self.vllm.pushed = self.run.step
        seed = self.cfg.seed * 1_000_003 + self.run.step * self.accelerator.num_processes + self.accelerator.process_index
        return self.vllm.sample(query_ids.to(self.device), query_mask.to(self.device), self.sampling, self.stop_ids,
                                self.tokenizer.pad_token_id, seed=seed)

    def score(self, prompts: list[str], rollout: Rollout) -> Scores:
        """2. Every reward on the decoded text; their weighted sum, then the EOS penalty, normalisation, clipping."""
        cfg = self.cfg
        responses = [t.strip() for t in self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)]
        components = {name: s.to(self.device).float() for name, s in self.reward.components(prompts, responses).items()}
        raw = sum(w * components[r.name] for w, r in self.reward.terms)
        shaped = raw.clone()
        if cfg.missing_eos_penalty is not None:
            shaped = shaped - cfg.missing_eos_penalty * (~rollout.ended).float()
        if cfg.normalize_reward:
            self.moments.update(self.gather(shaped))
            shaped = (shaped - self.moments.mean) / self.moments.std
        if cfg.reward_clip is not None:
            shaped = shaped.clamp(-cfg.reward_clip, cfg.reward_clip)
        return Scores(components, raw, shaped)

    @torch.no_grad()
    def reference(self, rollout: Rollout
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """3. (log pi_ref, 1 - pi_ref(S), log pi_old, V_old): the reference forward, log pi_ref(a_t) its whole softmax
        at the sampling temperature (see rlhfkit.rollout); the critic's and pi_old's where the sampler could not
        record them (a separate critic; `recompute_logprobs`); and, for k3 under truncation, the reference's mass
        outside the set S_t of tokens pi_old keeps, which needs pi_old's logits (a policy forward)."""
        ref, dropped, old, values = [], [], [], []
        policy_forward = self.cfg.recompute_logprobs or self.k3_needs_kept_mass
        with self.accelerator.autocast():
            for _, rows in self.micro_batches(torch.arange(len(rollout), device=self.device),
                                              self.cfg.rollout_forward_batch_size):
                part = rollout.select(rows)
                ref_logits = self.reference_logits(part)
                ref.append(token_logprobs(ref_logits, part.response_ids, self.sampling.untruncated))
                if policy_forward:
                    logits, part_values = self.policy_logits(part, train=False)
                    old.append(self.logprobs(logits, part))
                    values.append(part_values)
                    if self.k3_needs_kept_mass:
                        dropped.append(dropped_mass(logits, ref_logits, self.sampling))
                elif self.critic is not None:
                    values.append(self.critic_values(part))
        old_logprobs = torch.cat(old) * rollout.response_mask if self.cfg.recompute_logprobs else rollout.logprobs
        old_values = torch.cat(values).float() if self.critic is not None else rollout.values
        ref_logprobs = torch.cat(ref)
        ref_dropped = torch.cat(dropped) * rollout.response_mask if dropped else torch.zeros_like(ref_logprobs)
        return ref_logprobs, ref_dropped, old_logprobs, old_values

    def advantages(self, rollout: Rollout, scores: Scores) -> Targets:
        """4. The algorithm's advantages (rlhfkit.online.core has the math):
        ppo   r_t = -beta * KL_t plus s on the last token; GAE over the critic's values;
        rloo  R = s - beta * sum_t KL_t per response, minus the mean of its prompt's other samples' R;
        grpo  (s - mean) / std over the prompt's samples (Dr. GRPO: s - mean); the KL is a loss term instead.
        Then whitened over the batch where `whiten_advantages` (ppo's default)."""
        cfg, mask = self.cfg, rollout.response_mask.float()
        ref_logprobs, ref_dropped, old_logprobs, old_values = self.reference(rollout)
        kl = core.kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator, ref_dropped) * mask
        beta = self.kl_ctl.value if cfg.algorithm != "grpo" else 0.0  # grpo's KL is in its loss, not its reward
        token_rewards = core.per_token_rewards(scores.shaped, kl, mask, beta)
        returns = None
        if cfg.algorithm == "ppo":
            advantages, returns = core.gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        elif cfg.algorithm == "rloo":
            advantages = core.rloo_advantages(token_rewards.sum(-1), rollout.group)[:, None] * mask
        else:
            advantages = core.group_advantages(scores.shaped, rollout.group, scale=not cfg.dr_grpo)[:, None] * mask
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask, self.reduce)
        return Targets(old_logprobs, ref_logprobs, ref_dropped, kl, token_rewards, advantages, old_values, returns)

    def update(self, rollout: Rollout, targets: Targets) -> dict[str, float]:
        """5. `ppo_epochs` passes over shuffled minibatches, one optimizer step each; returns the update's stats."""
        cfg = self.cfg
        stats = {k: torch.zeros((), device=self.device) for k in STAT_NAMES}
        gaps: list[tuple[torch.Tensor, torch.Tensor]] = []
        stopped_early = False
        order_gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.run.step)
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(rollout), generator=order_gen).to(self.device)
            for m in range(cfg.batch_size // cfg.mini_batch_size):
                rows = order[m * cfg.mini_batch_size:(m + 1) * cfg.mini_batch_size]
                mb_stats = self.minibatch_step(rollout, targets, rows, gaps if epoch == m == 0 else None)
                if mb_stats is None:
                    continue
                for k in stats:
                    stats[k] += mb_stats[k]
                if cfg.target_approx_kl is not None and (
                        mb_stats["approx_kl"] / mb_stats["tokens"].clamp(min=1)).item() > cfg.target_approx_kl:
                    stopped_early = True
                    break
            if stopped_early:
                break
        tokens = max(stats["tokens"].item(), 1)
        values = {"loss/value": stats["vf"].item() / tokens, "value/clipfrac": stats["vf_clipfrac"].item() / tokens}
        return {
            "policy/clipfrac": stats["clipfrac"].item() / tokens,
            "policy/approx_kl": stats["approx_kl"].item() / tokens,
            "policy/outside_support": stats["outside_support"].item() / tokens,
            "loss/policy": stats["pg"].item() / tokens,
            **(values if cfg.critic != "none" else {}),
            **({"loss/kl": stats["kl"].item() / tokens} if cfg.algorithm == "grpo" else {}),
            "train/early_stopped": float(stopped_early),
            **self._gap_metrics(gaps),
        }

    def minibatch_step(self, rollout: Rollout, targets: Targets, rows: torch.Tensor,
                       gaps: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, torch.Tensor] | None:
        """Loss over the minibatch `rows` (micro-batched), one optimizer step; None when the step was skipped for
        NaN/Inf. With `gaps`, each micro-batch's |log pi (this forward) - log pi (sampler)| per token is appended.

        Per token: the clipped policy loss, + vf_coef * the clipped value loss (ppo), + beta * k3 to the reference
        (grpo); weighed into one number by `loss_aggregation` over the minibatch's tokens on every process."""
        cfg, accelerator, mask = self.cfg, self.accelerator, rollout.response_mask.float()
        weights = torch.zeros_like(mask)
        weights[rows] = core.token_weights(mask[rows], cfg.loss_aggregation, self.reduce, cfg.sampling.max_new_tokens)
        stats = {k: torch.zeros((), device=self.device) for k in STAT_NAMES}
        for last, idx in self.micro_batches(rows):
            part, part_mask = rollout.select(idx), mask[idx]
            with ExitStack() as stack:
                if not last:
                    for model in self.trained:
                        stack.enter_context(accelerator.no_sync(model))
                with accelerator.autocast():
                    logprobs, values = self.forward(part, train=True)
                # a sampled token the updated policy no longer keeps (top-k/top-p): log pi = -inf, ratio 0
                outside = torch.isneginf(logprobs.detach()) & (part_mask > 0)
                pg = losses.clipped_policy_loss(logprobs, targets.old_logprobs[idx], targets.advantages[idx],
                                                part_mask, cfg.clip_range)
                per_token = pg.per_token
                if values is not None:
                    vf, vf_clipped = losses.clipped_value_loss(values, targets.old_values[idx], targets.returns[idx],
                                                               part_mask, cfg.clip_range_value)
                    per_token = per_token + cfg.vf_coef * vf
                    stats["vf"] += vf.sum().detach()
                    stats["vf_clipfrac"] += core.masked_sum(vf_clipped, part_mask)
                if cfg.algorithm == "grpo":
                    kl = losses.k3_kl_term(logprobs, targets.ref_logprobs[idx], part_mask, targets.ref_dropped[idx])
                    per_token = per_token + self.kl_ctl.value * kl
                    stats["kl"] += kl.sum().detach()
                # DDP averages gradients over processes; the factor makes the weights' sum over all of them count.
                accelerator.backward((per_token * weights[idx]).sum() * accelerator.num_processes)
            with torch.no_grad():
                if gaps is not None:
                    gaps.append(((logprobs.detach() - rollout.logprobs[idx]).abs() * part_mask, part_mask))
                stats["pg"] += pg.loss_sum.detach()
                stats["clipfrac"] += core.masked_sum(pg.clipped, part_mask)
                # tokens outside the updated policy's support are counted apart
                stats["approx_kl"] += core.masked_sum(core.approx_kl(pg.log_ratio.detach().masked_fill(outside, 0.0)),
                                                      part_mask)
                stats["outside_support"] += outside.sum()
                stats["tokens"] += part_mask.sum()
        stats = {k: self.reduce(v) for k, v in stats.items()}
        return stats if self._optimizer_step(stats) else None

    def _gap_metrics(self, gaps: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Largest and mean |log pi_train - log pi_sampler| over the first minibatch's tokens, over processes."""
        diffs = torch.cat([d.flatten() for d, _ in gaps])
        largest = self.gather(diffs.max().reshape(1)).max()
        totals = self.reduce(torch.stack([diffs.sum(), sum(m.sum() for _, m in gaps)]))
        return {"rollout/logprob_gap_max": largest.item(),
                "rollout/logprob_gap_mean": (totals[0] / totals[1].clamp(min=1)).item()}

    def _optimizer_step(self, stats: dict[str, torch.Tensor]) -> bool:
        """Clip, step, schedule (rlhfkit.runs.optimizer_step: fp16 overflow goes through the GradScaler); a NaN/Inf
        loss skips the update and counts against `max_nonfinite_updates`."""
        outcome = optimizer_step(self.accelerator, self.optimizer, self.scheduler, self.params, self.cfg.max_grad_norm,
                                 stats["pg"] + stats["vf"] + stats["kl"])
        if not outcome.ok:
            self.run.guard.failed(self.run.step)
        return outcome.ok

    # --- one iteration, and the run ------------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One iteration: the five phases, then the KL controller; returns the step's metrics."""
        cfg, accelerator = self.cfg, self.accelerator
        t_start = time.perf_counter()
        k = cfg.sampling.num_samples
        indices = batch_prompt_indices(len(self.prompts), cfg.seed, self.run.step, cfg.batch_size // k,
                                       accelerator.process_index, accelerator.num_processes)
        prompts = [self.prompts[i] for i in indices]
        rollout = self.rollout(prompts)  # K samples of each prompt, adjacent
        t_generated = time.perf_counter()
        scores = self.score([p for p in prompts for _ in range(k)], rollout)
        targets = self.advantages(rollout, scores)
        t_scored = time.perf_counter()
        update = self.update(rollout, targets)
        if self.vllm is not None:
            check_gap(update["rollout/logprob_gap_mean"], cfg.sampling.vllm_max_logprob_gap, self.vllm.client.url)
        t_trained = time.perf_counter()
        self.run.step += 1
        kl_coef = self.kl_ctl.value
        seq_kl = self.gather(targets.kl.sum(-1))
        self.kl_ctl.update(seq_kl.mean().item(), n_steps=len(seq_kl))
        times = {"generation": t_generated - t_start, "scoring": t_scored - t_generated,
                 "training": t_trained - t_scored, "step": t_trained - t_start}
        return self.metrics(rollout, scores, targets, update, seq_kl, kl_coef, times)

    @torch.no_grad()
    def metrics(self, rollout: Rollout, scores: Scores, targets: Targets, update: dict[str, float],
                seq_kl: torch.Tensor, kl_coef: float, times: dict[str, float]) -> dict[str, float]:
        """The step's metrics, global over processes."""
        gather, mask = self.gather, rollout.response_mask.float()
        lengths = gather(rollout.response_mask.sum(-1).float())
        all_scores = gather(scores.raw)
        values = targets.old_values
        critic = {} if values is None else {
            "value/explained_variance": core.explained_variance(values, targets.returns, mask, self.reduce),
            "value/mean": core.masked_mean(values, mask, self.reduce).item(),
        }
        return {
            "reward/score": all_scores.mean().item(),
            "reward/score_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
            "reward/normalized": gather(scores.shaped).mean().item(),
            **{f"reward/{name}": gather(v).mean().item() for name, v in scores.components.items()},
            "reward/with_kl": gather(targets.token_rewards.sum(-1)).mean().item(),
            "kl/ref": seq_kl.mean().item(),
            "kl/coef": kl_coef,
            "policy/entropy": core.masked_mean(rollout.entropy, mask, self.reduce).item(),
            **update,
            **critic,
            "response/length": lengths.mean().item(),
            "response/eos_rate": gather(rollout.ended.float()).mean().item(),
            "train/lr": self.scheduler.get_last_lr()[0],
            **{f"time/{k}": v for k, v in times.items()},
            "throughput/tokens_per_s": lengths.sum().item() / times["step"],
            "throughput/episodes_per_s": len(lengths) / times["step"],
        }

    def train(self) -> PPOResult:
        cfg, run = self.cfg, self.run
        result = PPOResult(output_dir=cfg.output_dir, steps=run.step)
        before = self.preview()
        progress = tqdm(total=cfg.steps, initial=run.step, desc="ppo",
                        disable=not self.accelerator.is_local_main_process)
        for model in self.trained:
            model.train()
        try:
            while run.step < cfg.steps:
                logged = self.step()
                progress.update(1)
                step = run.step
                if step % cfg.log_every == 0 or step == cfg.steps:
                    run.log(logged)
                    result.history.append({"step": step, **logged})
                    progress.set_postfix(reward=f"{logged['reward/score']:.3f}", kl=f"{logged['kl/ref']:.3f}",
                                         len=f"{logged['response/length']:.0f}")
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    self.save_checkpoint()
        finally:
            progress.close()
            run.metrics.close()
            if self.vllm is not None:
                self.vllm.close()
        result.steps = run.step
        self.save_checkpoint()
        policy = self.accelerator.unwrap_model(self.policy)
        save_final_model(policy.lm, self.tokenizer, cfg.output_dir, self.accelerator, adapter=cfg.lora.enabled,
                         merge=cfg.merge_adapter)
        self._write_previews(result, before, self.preview())
        run.close()
        return result

    # --- previews -----------------------------------------------------------------------------------------------

    def preview(self) -> list[dict]:
        """Greedy answers to the preview prompts and their reward scores (main process; the others wait)."""
        out: list[dict] = []
        if self.preview_prompts and self.accelerator.is_main_process:
            lm = self.accelerator.unwrap_model(self.policy).lm
            answers = generate_responses(lm, self.tokenizer, self.preview_prompts,
                                         max_new_tokens=self.cfg.preview.max_new_tokens,
                                         system_prompt=self.cfg.system_prompt, grounding=self.grounding,
                                         max_prompt_length=self.cfg.max_prompt_length)
            parts = self.reward.components(self.preview_prompts, answers)
            out = [{"response": a, "scores": {name: round(float(v[i]), 4) for name, v in parts.items()}}
                   for i, a in enumerate(answers)]
        self.accelerator.wait_for_everyone()
        return out

    def _write_previews(self, result: PPOResult, before: list[dict], after: list[dict]) -> None:
        if not (self.accelerator.is_main_process and self.preview_prompts):
            return
        records = []
        for prompt, b, a in zip(self.preview_prompts, before, after):
            result.previews.append({"prompt": prompt, "before": b["response"], "after": a["response"],
                                    "scores_before": b["scores"], "scores_after": a["scores"]})
            records += [{"prompt": prompt, "model": which, **entry} for which, entry in (("before", b), ("after", a))]
        write_jsonl(self.cfg.output_dir / "samples.jsonl", records)
