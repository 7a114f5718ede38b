"""THE sampler: prompts in, K samples per prompt out, with the log-prob of every sampled token (and the policy's
value there, when it has a value head) recorded under the very distribution it was drawn from.

Every stage that samples calls `sample` (token level) or `generate_responses` (text level): PPO rollouts,
evaluation, previews, `rlhfkit simulate`, `rlhfkit generate` and the feedback app's sampling jobs.

Why not `model.generate`: it fills every setting not passed explicitly from the model's own generation_config
(repetition_penalty, sequence_bias, min_new_tokens, forced_eos_token_id ...), so a model's config could change
the distribution sampled behind the trainer's back; it runs its logits processors every step whether they do
anything or not; and it keeps no log-probs, so PPO paid a second forward pass to recompute them. Here the loop is
ours and short:

  prefill   the prefix all prompts share (a system prompt) once, each distinct prompt once, into a preallocated
            (static) KV cache whose rows are then repeated for the K samples of each prompt (rollout.prefix);
  decode    per step: the distribution of `distribution.py` from the last logits, draw a_t, record log pi(a_t),
            H(pi) and V(s_t), one forward of the new tokens; stop when every row has hit a stop token.

LoRA adapters are folded into the weights for the duration (W' = W + (alpha / r) B A, adapter path off), so a
decode step costs what the base model's does; the original weight tensors are restored untouched on exit.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StaticCache

from rlhfkit.rollout.batch import Rollout, encode_prompts, stop_token_ids, truncate_after_stop
from rlhfkit.rollout.distribution import Sampling, sampling_logits
from rlhfkit.rollout.prefix import PromptPlan

def _lora_layers(lm: nn.Module) -> list[nn.Module]:
    """The LoRA layers of a peft model whose adapters can be folded exactly (plain Linear, float weights)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft is a dependency; without it there is nothing to fold
        return []
    layers = [m for m in lm.modules() if isinstance(m, LoraLayer)]
    foldable = all(
        isinstance(m.get_base_layer(), nn.Linear) and m.get_base_layer().weight.dtype.is_floating_point
        and not any(m.use_dora.get(name, False) for name in m.active_adapters) and not m.merged
        for m in layers
    )
    return layers if foldable else []


@contextmanager
def folded_lora(lm: nn.Module):
    """`lm` with its active LoRA adapters folded into the base weights and the adapter path switched off.

    The base weight tensors are never written: each layer's `weight.data` points at a new tensor W + delta W for
    the duration and back at the original afterwards, so the weights are bit-identical after. Models without
    LoRA, and adapters that cannot be folded exactly (4-bit weights, DoRA), run as they are.
    """
    layers = _lora_layers(lm)
    if not layers or not hasattr(lm, "disable_adapter"):
        yield lm
        return
    saved = []
    try:
        with torch.no_grad():
            for layer in layers:
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(name) for name in layer.active_adapters if name in layer.lora_A)
                saved.append((weight, weight.data))
                weight.data = weight.data + delta.to(weight.dtype)
        with lm.disable_adapter():
            yield lm
    finally:
        for weight, data in saved:
            weight.data = data


def choose(logits: torch.Tensor, sampling: Sampling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The next token of each row [B] from its logits [B, V], with log pi(token) and H(pi) (zeros when greedy)."""
    z = sampling_logits(logits, sampling)
    if sampling.greedy:
        zeros = z.new_zeros(len(z))
        return z.argmax(-1), zeros, zeros
    log_pi = z - torch.logsumexp(z, -1, keepdim=True)
    pi = log_pi.exp()
    token = draw(pi)
    return token, log_pi.gather(-1, token[:, None]).squeeze(-1), torch.special.entr(pi).sum(-1)


def draw(pi: torch.Tensor) -> torch.Tensor:
    """One token per row from the categorical distributions `pi` [B, V], by inverting the cumulative distribution
    with one uniform number per row (torch.multinomial draws an exponential per vocabulary entry: 16 ms a step
    for 8 x 49,152 on a CPU core). A token of probability 0 is never drawn: the CDF does not rise there."""
    cdf = pi.cumsum(-1)
    u = torch.rand((pi.shape[0], 1), device=pi.device, dtype=cdf.dtype) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # u rounded up to the total (about once in 2^24 draws): the most likely token instead of one past the end
    return torch.where(token < pi.shape[-1], token, pi.argmax(-1))


# Causal LMs whose logits are exactly their output embedding applied to the last hidden state (no soft-capping or
# scaling between them), for which the decode step computes that product itself (see `_decode_step`).
PLAIN_HEADS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM")


def _decode_step(model: nn.Module, want_hidden: bool, compile: bool):
    """step(**forward kwargs) -> (last-position logits [B, V], last hidden state [B, H] or None), for one new token
    per row; compiled once per model when asked (static shapes: a fixed batch, a cache length rounded up, the
    full-width mask every step).

    For the plain heads above the logits are computed as W_out @ h^T: with a handful of rows, the CPU matmul
    kernels run that orientation 1.6-1.9x faster than h @ W_out^T (the 49,152 x 576 vocabulary matrix is a
    quarter of a decode step's weight reads on the bundled model); the same numbers up to float rounding.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if type(base).__name__ in PLAIN_HEADS and getattr(head, "bias", None) is None:
        body = base.get_decoder()

        def step(**kwargs):
            hidden = body(**kwargs).last_hidden_state[:, -1]
            return (head.weight @ hidden.T).T, hidden
    else:
        def step(**kwargs):
            out = model(**kwargs, logits_to_keep=1, output_hidden_states=want_hidden)
            return out.logits[:, -1], out.hidden_states[-1][:, -1] if want_hidden else None
    if not compile:
        return step
    compiled = getattr(model, "_rlhfkit_decode_step", {})
    if want_hidden not in compiled:
        compiled[want_hidden] = torch.compile(step, dynamic=False)
        model._rlhfkit_decode_step = compiled
    return compiled[want_hidden]


@torch.no_grad()
def sample(lm: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, sampling: Sampling,
           stop_ids: Sequence[int], pad_id: int, value_head: nn.Module | None = None,
           compile: bool | None = None) -> Rollout:
    """K = `sampling.num_samples` responses per left-padded prompt (rows prompt-major: the K answers of prompt i
    are rows i*K .. i*K+K-1), with log pi(a_t), entropy and (with `value_head`) V(s_t) recorded while sampling.

    `value_head` reads the LM's last hidden state, as `PolicyModel` does in its training forward. `compile`
    runs the decode step through `torch.compile` (default: on CUDA, where per-step overhead dominates; on a CPU
    the compilation takes minutes and buys about a fifth of a step).
    """
    device = query_ids.device
    k, steps = sampling.num_samples, sampling.max_new_tokens
    group = torch.arange(len(query_ids), device=device).repeat_interleave(k)
    plan = PromptPlan.of(query_ids, query_mask)
    rows = plan.rows[group]  # the distinct prompt each of the B = prompts x K rows answers
    batch = len(rows)
    stop = torch.tensor(list(stop_ids), device=device)
    tokens = torch.full((batch, steps), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((batch, steps), device=device)
    entropies = torch.zeros((batch, steps), device=device)
    values = torch.zeros((batch, steps), device=device) if value_head is not None else None
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    want_hidden = value_head is not None

    with folded_lora(lm) as model:
        # prefill: the shared prefix once, each distinct prompt once, then the cache rows repeated for their samples
        width = len(plan.prefix) + plan.own_ids.shape[1]
        compile = device.type == "cuda" if compile is None else compile
        length = width + steps if not compile else -(-(width + steps) // 64) * 64  # few shapes, few compilations
        cache = StaticCache(config=model.config, max_cache_len=length)
        out, prompt_mask = plan.encode(model, cache, output_hidden_states=want_hidden)
        cache.reorder_cache(rows)
        logits = out.logits[:, -1][rows]
        hidden = out.hidden_states[-1][:, -1][rows] if want_hidden else None
        mask = torch.cat([prompt_mask[rows], prompt_mask.new_zeros((batch, length - width))], dim=1)
        next_position = plan.prompt_positions()[:, -1][rows]
        step = _decode_step(model, want_hidden, compile)
        for t in range(steps):
            a, logprobs[:, t], entropies[:, t] = choose(logits, sampling)
            if value_head is not None:
                values[:, t] = value_head(hidden).squeeze(-1).float()
            tokens[:, t] = a.masked_fill(done, pad_id)
            done |= torch.isin(a, stop)
            if bool(done.all()) or t == steps - 1:
                break
            mask[:, width + t] = 1
            next_position = next_position + 1
            logits, hidden = step(input_ids=tokens[:, t:t + 1], attention_mask=mask, position_ids=next_position[:, None],
                                  cache=cache, cache_position=torch.tensor([width + t], device=device), use_cache=True)

    response, response_mask, ended = truncate_after_stop(tokens, stop_ids, pad_id)
    used = max(int(response_mask.sum(-1).max()), 1)  # drop columns that are padding in every row
    keep = response_mask[:, :used].to(logprobs.dtype)

    def trim(x):
        return None if x is None else (x[:, :used] * keep).contiguous()

    return Rollout(query_ids[group], query_mask[group], response[:, :used].contiguous(),
                   response_mask[:, :used].contiguous(), ended, group,
                   logprobs=None if sampling.greedy else trim(logprobs),
                   entropy=None if sampling.greedy else trim(entropies), values=trim(values))


def generate_responses(model, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: int = 128,
                       do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                       num_samples: int = 1, batch_size: int = 8, system_prompt: str | None = None,
                       max_prompt_length: int | None = None, grounding=None) -> list[str]:
    """Text in, text out: each prompt's answer (greedy unless `do_sample`), chat-formatted, through `sample`.

    With `num_samples` K the list holds K answers per prompt, prompt-major. `batch_size` counts sequences.
    """
    sampling = Sampling(max_new_tokens, temperature, top_p, top_k, num_samples, greedy=not do_sample)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stop_ids = stop_token_ids(tokenizer, model)
    per_batch = max(1, batch_size // num_samples)
    answers: list[str] = []
    try:
        for start in range(0, len(prompts), per_batch):
            query_ids, query_mask = encode_prompts(tokenizer, prompts[start:start + per_batch], max_prompt_length,
                                                   system_prompt, grounding)
            rollout = sample(model, query_ids.to(device), query_mask.to(device), sampling, stop_ids,
                             tokenizer.pad_token_id)
            answers += [t.strip() for t in tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return answers
