"""PPO fine-tuning of a language model against rewards, with a KL penalty against the frozen starting model.

One iteration (`step`):
  1. rollout   sample one response per prompt from the policy (KV cache, left-padded prompts);
  2. score     decode the responses and score the text with every reward (so reward models with another
               tokenizer work too); one forward each for the policy's own log-probs (pi_old), the reference
               (pi_ref) and the critic (V_old);
  3. rewards   r_t = -beta * KL_t per token, plus the score on the last real token; GAE gives A_t and returns;
  4. update    `ppo_epochs` passes over shuffled minibatches: clipped policy loss + vf_coef * clipped value loss,
               token-averaged over the minibatch (all micro-batches and processes), one optimizer step each.

Built on accelerate: one process here, `accelerate launch` / torchrun for several. Each process rolls out its
own `batch_size` prompts; statistics that normalise (advantage whitening, token counts) are global.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlhfkit.config import PPOConfig, dump_config
from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.data.records import load_prompts
from rlhfkit.errors import NonFiniteError, RlhfkitError
from rlhfkit.generation import generate_responses
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.ppo import core
from rlhfkit.ppo.models import build_critic, build_policy
from rlhfkit.ppo.rollout import Rollout, SamplingSettings, encode_prompts, sample_responses, stop_token_ids
from rlhfkit.reward.scorers import Reward, RewardModelReward, WeightedSum, load_scorer
from rlhfkit.runs import (
    adamw,
    MetricsWriter,
    check_output_dir,
    checkpoint_tmp_path,
    commit_checkpoint,
    make_accelerator,
    prepare_output_dir,
    read_checkpoint_state,
    resolve_checkpoint,
    save_final_model,
    save_trainable_only,
    start_tracking,
)

logger = logging.getLogger(__name__)


@dataclass
class PPOResult:
    output_dir: Path
    steps: int
    history: list[dict] = field(default_factory=list)  # the metrics of every logged step
    previews: list[dict] = field(default_factory=list)  # {"prompt", "before", "after", "scores_before", "scores_after"}


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
    accelerator = make_accelerator(cfg.mixed_precision, cfg.output_dir, cfg.report_to)
    checkpoint = resolve_checkpoint(cfg.output_dir, cfg.resume_from)
    check_output_dir(cfg.output_dir, cfg.overwrite, resuming=checkpoint is not None)  # fail fast, write nothing yet
    set_seed(cfg.seed)
    device = accelerator.device

    # Inputs first: a run refused for bad data, rewards or model name leaves no output directory behind.
    tokenizer = load_tokenizer(cfg.model)
    prompts = [r.prompt for r in load_prompts(cfg.prompts_file)]
    preview_prompts = []
    if cfg.preview.num_prompts:
        source = [r.prompt for r in load_prompts(cfg.eval_prompts_file)] if cfg.eval_prompts_file else prompts
        preview_prompts = source[:: max(1, len(source) // cfg.preview.num_prompts)][: cfg.preview.num_prompts]
    if rewards is None:
        reward, reward_model_path = build_reward(cfg, device)
    else:
        reward, reward_model_path = (rewards if isinstance(rewards, WeightedSum) else WeightedSum([(1.0, rewards)])), None
    prepare_output_dir(accelerator, cfg.output_dir, cfg.overwrite, resuming=checkpoint is not None)
    if accelerator.is_main_process:
        dump_config(cfg, cfg.output_dir / "config.yaml")

    policy, reference = build_policy(cfg)
    critic = build_critic(cfg, tokenizer, reward_model_path) if cfg.critic == "separate" else None
    stop_ids = stop_token_ids(tokenizer, policy.lm)
    policy.to(device)
    if reference is not None:
        reference.to(device)
    if critic is not None:
        critic.to(device)
    if cfg.lora.enabled:
        accelerator.register_save_state_pre_hook(save_trainable_only)

    before = _preview(policy, tokenizer, preview_prompts, reward, cfg, accelerator)

    policy_params = [p for p in policy.parameters() if p.requires_grad]
    critic_params = [p for p in critic.parameters() if p.requires_grad] if critic is not None else []
    groups = [{"params": policy_params, "lr": cfg.learning_rate}]
    if critic_params:
        groups.append({"params": critic_params, "lr": cfg.critic_learning_rate or cfg.learning_rate})
    optimizer = adamw(groups, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if critic is not None:
        policy, critic, optimizer = accelerator.prepare(policy, critic, optimizer)
    else:
        policy, optimizer = accelerator.prepare(policy, optimizer)
    trained = [m for m in (policy, critic) if m is not None]
    all_params = policy_params + critic_params

    num_minibatches = cfg.batch_size // cfg.mini_batch_size
    micro = cfg.micro_batch_size or cfg.mini_batch_size
    total_updates = cfg.steps * cfg.ppo_epochs * num_minibatches
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_updates),
                              num_training_steps=total_updates)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us, once per optimizer step

    kl_ctl = (core.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.kl_controller == "adaptive"
              else core.FixedKLController(cfg.kl_coef))
    moments = core.RunningMoments()
    nonfinite = 0
    step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint), strict=False)
        state = read_checkpoint_state(checkpoint)
        step, nonfinite = state["step"], state["nonfinite_updates"]
        kl_ctl.load_state_dict(state["kl_controller"])
        moments.load_state_dict(state["reward_moments"])
        logger.info("resumed from %s at step %d", checkpoint, step)

    start_tracking(accelerator, cfg)
    metrics = MetricsWriter(cfg.output_dir / "metrics.jsonl", enabled=accelerator.is_main_process,
                            resumed_at=step if checkpoint is not None else None)
    result = PPOResult(output_dir=cfg.output_dir, steps=step)
    reduce = lambda x: accelerator.reduce(x, "sum")  # noqa: E731
    gather = lambda x: accelerator.gather(x.contiguous())  # noqa: E731
    sampling = SamplingSettings(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.top_k)
    temperature = cfg.sampling.temperature

    def save_checkpoint(at: int) -> None:
        tmp = checkpoint_tmp_path(cfg.output_dir, at)
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"step": at, "nonfinite_updates": nonfinite, "kl_controller": kl_ctl.state_dict(),
                     "reward_moments": moments.state_dict()}
            commit_checkpoint(cfg.output_dir, at, state, cfg.save_total_limit)
        accelerator.wait_for_everyone()

    def forward_rollout(batch: Rollout, train: bool):
        """(log pi(a_t), V(s_t), logits) for the batch's response tokens, through the prepared (DDP) modules."""
        inputs = batch.inputs()
        width = batch.response_ids.shape[1]
        model = policy if train else accelerator.unwrap_model(policy)
        logits, values = model(**inputs, response_width=width)
        if critic is not None:
            values = (critic if train else accelerator.unwrap_model(critic))(**inputs, response_width=width)
        return core.logprobs_from_logits(logits, batch.response_ids, temperature), values, logits

    @torch.no_grad()
    def reference_logprobs(batch: Rollout) -> torch.Tensor:
        inputs, width = batch.inputs(), batch.response_ids.shape[1]
        if reference is not None:
            logits = reference(**inputs, logits_to_keep=width + 1, use_cache=False).logits[:, :-1]
        else:
            unwrapped = accelerator.unwrap_model(policy)
            with unwrapped.as_reference():
                logits, _ = unwrapped(**inputs, response_width=width)
        return core.logprobs_from_logits(logits, batch.response_ids, temperature)

    progress = tqdm(total=cfg.steps, initial=step, desc="ppo", disable=not accelerator.is_local_main_process)
    for model in trained:
        model.train()
    while step < cfg.steps:
        t_start = time.perf_counter()
        # 1. rollout
        indices = batch_prompt_indices(len(prompts), cfg.seed, step, cfg.batch_size, accelerator.process_index,
                                       accelerator.num_processes)
        batch_prompts = [prompts[i] for i in indices]
        query_ids, query_mask = encode_prompts(tokenizer, batch_prompts, cfg.max_prompt_length, cfg.system_prompt)
        with accelerator.autocast():
            rollout = sample_responses(accelerator.unwrap_model(policy), query_ids.to(device), query_mask.to(device),
                                       sampling, stop_ids, tokenizer.pad_token_id)
        t_generated = time.perf_counter()

        # 2. score
        responses = [t.strip() for t in tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)]
        components = {name: s.to(device).float() for name, s in reward.components(batch_prompts, responses).items()}
        raw_score = sum(w * components[r.name] for w, r in reward.terms)
        score = raw_score.clone()
        if cfg.missing_eos_penalty is not None:
            score = score - cfg.missing_eos_penalty * (~rollout.ended).float()
        if cfg.normalize_reward:
            moments.update(gather(score))
            score = (score - moments.mean) / moments.std
        if cfg.reward_clip is not None:
            score = score.clamp(-cfg.reward_clip, cfg.reward_clip)
        mask = rollout.response_mask.float()
        with torch.no_grad(), accelerator.autocast():
            old_logprobs, old_values, chunks_entropy = [], [], []
            ref_logprobs = []
            for start in range(0, len(rollout), micro):
                part = rollout.select(torch.arange(start, min(start + micro, len(rollout)), device=device))
                logprobs, values, logits = forward_rollout(part, train=False)
                old_logprobs.append(logprobs)
                old_values.append(values)
                chunks_entropy.append(core.entropy_from_logits(logits, temperature))
                ref_logprobs.append(reference_logprobs(part))
            old_logprobs, old_values = torch.cat(old_logprobs), torch.cat(old_values).float()
            entropy, ref_logprobs = torch.cat(chunks_entropy), torch.cat(ref_logprobs)

        # 3. rewards and advantages
        kl = core.kl_estimate(old_logprobs, ref_logprobs, cfg.kl_estimator) * mask
        token_rewards = core.per_token_rewards(score, kl, mask, kl_ctl.value)
        advantages, returns = core.gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask, reduce)
        t_scored = time.perf_counter()

        # 4. update
        stats = {k: torch.zeros((), device=device) for k in ("pg", "vf", "clipfrac", "vf_clipfrac", "approx_kl", "tokens")}
        stopped_early = False
        order_gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(rollout), generator=order_gen).to(device)
            for m in range(num_minibatches):
                mb = order[m * cfg.mini_batch_size:(m + 1) * cfg.mini_batch_size]
                n_tokens = reduce(mask[mb].sum())  # the minibatch's tokens over all processes: the loss normaliser
                mb_stats = {k: torch.zeros((), device=device) for k in stats}
                for start in range(0, len(mb), micro):
                    idx = mb[start:start + micro]
                    part, part_mask = rollout.select(idx), mask[idx]
                    last = start + micro >= len(mb)
                    with ExitStack() as stack:
                        if not last:
                            for model in trained:
                                stack.enter_context(accelerator.no_sync(model))
                        with accelerator.autocast():
                            logprobs, values, _ = forward_rollout(part, train=True)
                        pg = core.clipped_policy_loss(logprobs, old_logprobs[idx], advantages[idx], part_mask, cfg.clip_range)
                        vf_sum, vf_clipped = core.clipped_value_loss(values, old_values[idx], returns[idx], part_mask,
                                                                     cfg.clip_range_value)
                        # DDP averages gradients over processes; the factor makes it a mean over all tokens.
                        loss = (pg.loss_sum + cfg.vf_coef * vf_sum) * accelerator.num_processes / n_tokens
                        accelerator.backward(loss)
                    with torch.no_grad():
                        mb_stats["pg"] += pg.loss_sum.detach()
                        mb_stats["vf"] += vf_sum.detach()
                        mb_stats["clipfrac"] += core.masked_sum(pg.clipped, part_mask)
                        mb_stats["vf_clipfrac"] += core.masked_sum(vf_clipped, part_mask)
                        mb_stats["approx_kl"] += core.masked_sum(core.approx_kl(pg.log_ratio.detach()), part_mask)
                        mb_stats["tokens"] += part_mask.sum()
                mb_stats = {k: reduce(v) for k, v in mb_stats.items()}
                grad_norm = accelerator.clip_grad_norm_(all_params, cfg.max_grad_norm)
                finite = torch.isfinite(mb_stats["pg"] + mb_stats["vf"]) and torch.isfinite(torch.as_tensor(grad_norm))
                if finite:
                    optimizer.step()
                    for k in stats:
                        stats[k] += mb_stats[k]
                else:
                    nonfinite += 1
                    warnings.warn(f"step {step}: NaN or Inf in the loss or gradients; this update is skipped "
                                  f"({nonfinite} so far, {cfg.max_nonfinite_updates} tolerated)", stacklevel=1)
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if nonfinite > cfg.max_nonfinite_updates:
                    progress.close()
                    metrics.close()
                    raise NonFiniteError(
                        f"PPO stopped at step {step}: {nonfinite} updates had NaN or Inf in the loss or gradients. "
                        "Saved checkpoints are untouched. Common causes: a reward that returns NaN/Inf, too high a "
                        "learning_rate, or fp16 overflow (try mixed_precision=bf16 or no)."
                    )
                if (cfg.target_approx_kl is not None and finite
                        and (mb_stats["approx_kl"] / mb_stats["tokens"].clamp(min=1)).item() > cfg.target_approx_kl):
                    stopped_early = True
                    break
            if stopped_early:
                break
        t_trained = time.perf_counter()
        step += 1
        progress.update(1)

        # metrics (global over processes)
        with torch.no_grad():
            seq_kl = gather(kl.sum(-1))
            kl_ctl_value = kl_ctl.value
            kl_ctl.update(seq_kl.mean().item(), n_steps=len(seq_kl))
            lengths = gather(rollout.response_mask.sum(-1).float())
            all_scores = gather(raw_score)
            tokens = max(stats["tokens"].item(), 1)
            logged = {
                "reward/score": all_scores.mean().item(),
                "reward/score_std": all_scores.std().item() if len(all_scores) > 1 else 0.0,
                "reward/normalized": gather(score).mean().item(),
                **{f"reward/{name}": gather(v).mean().item() for name, v in components.items()},
                "reward/with_kl": gather(token_rewards.sum(-1)).mean().item(),
                "kl/ref": seq_kl.mean().item(),
                "kl/coef": kl_ctl_value,
                "policy/entropy": core.masked_mean(entropy, mask, reduce).item(),
                "policy/clipfrac": stats["clipfrac"].item() / tokens,
                "policy/approx_kl": stats["approx_kl"].item() / tokens,
                "loss/policy": stats["pg"].item() / tokens,
                "loss/value": stats["vf"].item() / tokens,
                "value/clipfrac": stats["vf_clipfrac"].item() / tokens,
                "value/explained_variance": core.explained_variance(old_values, returns, mask, reduce),
                "value/mean": core.masked_mean(old_values, mask, reduce).item(),
                "response/length": lengths.mean().item(),
                "response/eos_rate": gather(rollout.ended.float()).mean().item(),
                "train/lr": scheduler.get_last_lr()[0],
                "train/early_stopped": float(stopped_early),
                "time/generation": t_generated - t_start,
                "time/scoring": t_scored - t_generated,
                "time/training": t_trained - t_scored,
                "time/step": t_trained - t_start,
                "throughput/tokens_per_s": lengths.sum().item() / (t_trained - t_start),
                "throughput/episodes_per_s": len(lengths) / (t_trained - t_start),
            }
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics.write(step, logged)
            accelerator.log(logged, step=step)
            result.history.append({"step": step, **logged})
            progress.set_postfix(reward=f"{logged['reward/score']:.3f}", kl=f"{logged['kl/ref']:.3f}",
                                 len=f"{logged['response/length']:.0f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(step)
    progress.close()
    result.steps = step

    save_checkpoint(step)
    policy_model = accelerator.unwrap_model(policy)
    save_final_model(policy_model.lm, tokenizer, cfg.output_dir, accelerator, adapter=cfg.lora.enabled,
                     merge=cfg.merge_adapter)
    after = _preview(policy_model, tokenizer, preview_prompts, reward, cfg, accelerator)
    if accelerator.is_main_process and preview_prompts:
        records = []
        for prompt, b, a in zip(preview_prompts, before, after):
            result.previews.append({"prompt": prompt, "before": b["response"], "after": a["response"],
                                    "scores_before": b["scores"], "scores_after": a["scores"]})
            records += [{"prompt": prompt, "model": which, **entry} for which, entry in (("before", b), ("after", a))]
        write_jsonl(cfg.output_dir / "samples.jsonl", records)
    metrics.close()
    accelerator.end_training()
    return result


def _preview(policy, tokenizer, prompts: list[str], reward: WeightedSum, cfg: PPOConfig, accelerator) -> list[dict]:
    """Greedy answers to the preview prompts and their reward scores (main process; the others wait)."""
    out: list[dict] = []
    if prompts and accelerator.is_main_process:
        model = accelerator.unwrap_model(policy).lm
        answers = generate_responses(model, tokenizer, prompts, max_new_tokens=cfg.preview.max_new_tokens,
                                     system_prompt=cfg.system_prompt)
        parts = reward.components(prompts, answers)
        out = [{"response": a, "scores": {name: round(float(v[i]), 4) for name, v in parts.items()}}
               for i, a in enumerate(answers)]
    accelerator.wait_for_everyone()
    return out
