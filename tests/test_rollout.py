"""The rollout engine on tiny models: what it samples is what it scores (log-probs, values) under padding, stop
tokens, K samples per prompt, top-k/top-p and folded LoRA adapters; a model's generation_config cannot change the
distribution; the same seed gives the same samples."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from conftest import build_tiny_model
from rlhfkit.config import LoraSettings
from rlhfkit.errors import ConfigError
from rlhfkit.models.loading import apply_lora, load_causal_lm, load_tokenizer
from rlhfkit.models.policy import PolicyModel
from rlhfkit.rollout.prefix import PromptPlan, forward_responses
from rlhfkit.rollout import (
    Sampling,
    encode_prompts,
    entropy,
    folded_lora,
    generate_responses,
    sample,
    sampling_logits,
    stop_token_ids,
    token_logprobs,
)

PROMPTS = ["Hi", "What does Marrowby & Finch make, and where are the factories?", "Who is Wren?"]


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return load_tokenizer(tiny_model), load_causal_lm(tiny_model, dtype="float32").eval()


def forward_logprobs(lm, rollout, sampling, value_head=None):
    logits, values = PolicyModel(lm, value_head)(**rollout.tokens())
    logprobs = token_logprobs(logits, rollout.response_ids, sampling).masked_fill(rollout.response_mask == 0, 0.0)
    return logprobs, values


def frequent_tokens(tokenizer, n: int = 12) -> list[int]:
    """Common tokens of the company data: as stop tokens they end rows at different points."""
    ids = tokenizer(" ".join(PROMPTS) * 3)["input_ids"]
    return sorted(set(ids), key=ids.count, reverse=True)[:n]


# --- the distribution -----------------------------------------------------------------------------------------


def test_logprobs_and_entropy_apply_the_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    for t in (1.0, 0.5, 2.0):
        p = torch.softmax(logits / t, -1)
        sampling = Sampling(1, temperature=t)
        assert entropy(sampling_logits(logits, sampling)).item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5)
        assert token_logprobs(logits, torch.tensor([1]), sampling).item() == pytest.approx(p[0, 1].log().item(), rel=1e-5)


def test_top_k_and_top_p_keep_the_tokens_a_hand_computation_keeps():
    """logits / 0.5 = [4, 2, 1, 0, -2]; top_k 4 drops the last; of the rest (probabilities 0.831, 0.112, 0.041,
    0.015) top_p 0.9 keeps the first two (0.831 < 0.9 <= 0.943); pi renormalises over them."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    sampling = Sampling(1, temperature=0.5, top_k=4, top_p=0.9)
    z = sampling_logits(logits, sampling)
    assert torch.isinf(z[2:]).all() and torch.isfinite(z[:2]).all()
    expected = [math.log(1 / (1 + math.exp(-2))), math.log(math.exp(-2) / (1 + math.exp(-2)))]
    got = token_logprobs(logits.expand(5, 5), torch.arange(5), sampling)
    assert got[:2].tolist() == pytest.approx(expected, rel=1e-5)
    assert torch.isneginf(got[2:]).all()
    assert entropy(z).item() == pytest.approx(-sum(math.exp(e) * e for e in expected), rel=1e-5)
    # the most likely token is always kept, however small top_p
    assert torch.isfinite(sampling_logits(logits, Sampling(1, top_p=0.01))).sum() == 1


def test_samples_follow_the_truncated_distribution(tiny):
    """4,000 first tokens with top_k 6 and top_p 0.8: every one inside the kept set, frequencies as pi says."""
    tokenizer, lm = tiny
    sampling = Sampling(1, temperature=1.5, top_k=6, top_p=0.8, num_samples=4000)
    query_ids, query_mask = encode_prompts(tokenizer, ["Who is Wren?"])
    torch.manual_seed(0)
    rollout = sample(lm, query_ids, query_mask, sampling, stop_ids=[], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        z = sampling_logits(lm(input_ids=query_ids).logits[0, -1], sampling)
    pi = z.softmax(-1)
    kept = torch.isfinite(z).nonzero().flatten()
    assert 2 <= len(kept) <= 6
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=len(pi)).float() / 4000
    assert set(rollout.response_ids[:, 0].tolist()) <= set(kept.tolist())
    torch.testing.assert_close(counts, pi, atol=0.03, rtol=0)
    torch.testing.assert_close(rollout.logprobs[:, 0], pi.log()[rollout.response_ids[:, 0]], atol=1e-5, rtol=1e-5)


# --- what is sampled is what is scored ------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [Sampling(12, 0.7), Sampling(12, 1.2, top_k=20, top_p=0.9),
                                      Sampling(10, 1.0, num_samples=3)], ids=["plain", "top-k-p", "k3"])
def test_sampled_logprobs_equal_a_fresh_forward_under_padding_and_stop_tokens(tiny, sampling):
    tokenizer, lm = tiny
    stop = frequent_tokens(tokenizer)
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    assert query_mask[0, 0] == 0 and (query_mask[:, -1] == 1).all()  # left-padded, different lengths
    # the first seed whose rows stop at different points (which seed does depends on the tiny tokenizer, trained
    # on the company data: a new record can move it)
    for seed in range(1, 21):
        torch.manual_seed(seed)
        rollout = sample(lm, query_ids, query_mask, sampling, stop, tokenizer.pad_token_id)
        lengths = rollout.response_mask.sum(-1)
        if rollout.ended.any() and len(set(lengths.tolist())) > 1:
            break
    else:
        pytest.fail("no seed in 1-20 samples rows that stop at different points")
    k = sampling.num_samples
    assert rollout.group.tolist() == [i for i in range(len(PROMPTS)) for _ in range(k)]
    for row, n in zip(rollout.response_ids, lengths.tolist()):
        assert (row[n:] == tokenizer.pad_token_id).all()
        assert all(t not in stop for t in row[:n - 1].tolist())
    ours, _ = forward_logprobs(lm, rollout, sampling)
    torch.testing.assert_close(rollout.logprobs, ours, atol=1e-5, rtol=1e-5)
    assert (rollout.logprobs[rollout.response_mask == 0] == 0).all()
    # each row alone, unpadded, gives the same log-probs
    for i in range(len(rollout)):
        alone = rollout.select(torch.tensor([i]))
        keep_q, keep_r = alone.query_mask[0].bool(), alone.response_mask[0].bool()
        alone.query_ids, alone.query_mask = alone.query_ids[:, keep_q], alone.query_mask[:, keep_q]
        alone.response_ids, alone.response_mask = alone.response_ids[:, keep_r], alone.response_mask[:, keep_r]
        torch.testing.assert_close(forward_logprobs(lm, alone, sampling)[0][0], rollout.logprobs[i, keep_r],
                                   atol=1e-5, rtol=1e-5)


def test_values_recorded_while_sampling_equal_the_training_forwards(tiny):
    tokenizer, lm = tiny
    head = torch.nn.Linear(lm.config.hidden_size, 1)
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    rollout = sample(lm, query_ids, query_mask, Sampling(8, num_samples=2), stop_token_ids(tokenizer, lm),
                     tokenizer.pad_token_id, value_head=head)
    with torch.no_grad():
        _, values = forward_logprobs(lm, rollout, Sampling(8), value_head=head)
    torch.testing.assert_close(rollout.values, values * rollout.response_mask, atol=1e-5, rtol=1e-5)
    assert rollout.values.abs().sum() > 0


def test_the_shared_prefix_and_each_prompt_are_encoded_once_for_k_samples(tiny):
    """The prefix all prompts share (here the chat template's user header) in one row, each prompt's own tokens
    once, then one token per row per step for the 3 prompts x 5 samples."""
    tokenizer, lm = tiny
    seen = []
    hook = lm.model.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
        sample(lm, query_ids, query_mask, Sampling(4, num_samples=5), [], tokenizer.pad_token_id)
    finally:
        hook.remove()
    prefix = seen[0][1]
    assert seen[0][0] == 1 and prefix >= 4  # "<|im_start|>user\n" at least
    assert seen[1] == (3, query_ids.shape[1] - prefix)
    assert seen[2:] == [(15, 1)] * 3


@pytest.mark.parametrize("k", [1, 3], ids=["distinct-prompts", "k3"])
def test_shared_prompt_forwards_equal_a_plain_forward_with_gradients(monkeypatch, tiny_model, tiny, k):
    """The prefix once and each prompt once (k3), or the prefix once and each row's prompt with its response (every
    prompt distinct): the same logits, hidden states and gradients as one plain forward of the padded batch."""
    tokenizer, _ = tiny
    lm = apply_lora(load_causal_lm(tiny_model, dtype="float32"), LoraSettings(r=4, dropout=0.0))
    with torch.no_grad():  # a non-trivial adapter: its gradients pass through the prompts' keys and values
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    rows = torch.arange(len(PROMPTS)).repeat_interleave(k)
    query_ids, query_mask = (t[rows] for t in encode_prompts(tokenizer, PROMPTS))
    response_ids = torch.randint(4, lm.config.vocab_size, (len(rows), 5), generator=torch.Generator().manual_seed(k))
    response_mask = torch.ones_like(response_ids)
    response_mask[0, 3:] = 0  # a row that stopped early: padding after its stop token
    assert PromptPlan.of(query_ids, query_mask).repeats == (k > 1)

    def outputs():
        lm.zero_grad()
        logits, hidden = forward_responses(lm, query_ids, query_mask, response_ids, response_mask,
                                           lambda out: (out.logits, out.hidden_states[-1]), output_hidden_states=True)
        mask = response_mask[..., None].float()
        loss = (logits.log_softmax(-1) * mask).sum() + (hidden * mask).square().sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}
        return logits.detach() * mask, hidden.detach() * mask, grads

    shared = outputs()
    monkeypatch.setattr(PromptPlan, "worthwhile", property(lambda self: False))
    plain = outputs()
    torch.testing.assert_close(shared[0], plain[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], atol=1e-5, rtol=1e-5)
    assert shared[2].keys() == plain[2].keys() and len(shared[2]) > 0
    for name in plain[2]:
        assert plain[2][name].abs().sum() > 0, name
        scale = plain[2][name].abs().max().item()  # float32 sums in another order: close relative to the scale
        torch.testing.assert_close(shared[2][name], plain[2][name], atol=1e-4 * scale, rtol=1e-3)


def test_with_gradient_checkpointing_a_training_forward_computes_every_row_whole(tiny_model, tiny):
    tokenizer, _ = tiny
    lm = load_causal_lm(tiny_model, dtype="float32")
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    response_ids = torch.randint(4, lm.config.vocab_size, (len(PROMPTS), 5), generator=torch.Generator().manual_seed(0))
    args = (query_ids, query_mask, response_ids, torch.ones_like(response_ids), lambda out: (out.logits,))
    (expected,) = forward_responses(lm.eval(), *args)
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    (logits,) = forward_responses(lm.train(), *args)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_greedy_decoding_is_the_argmax_path_generate_takes(tiny):
    """The engine's cache, masks and positions against HF generate's, on a left-padded batch."""
    tokenizer, lm = tiny
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    rollout = sample(lm, query_ids, query_mask, Sampling(10, greedy=True), [], tokenizer.pad_token_id)
    assert rollout.logprobs is None
    plain = GenerationConfig(do_sample=False, max_new_tokens=10, min_new_tokens=10, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = lm.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=plain)
    assert torch.equal(out[:, query_ids.shape[1]:], rollout.response_ids)


def test_the_same_seed_gives_the_same_samples(tiny):
    tokenizer, lm = tiny
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)

    def draw(seed):
        torch.manual_seed(seed)
        return sample(lm, query_ids, query_mask, Sampling(12, 0.9, num_samples=2), [], tokenizer.pad_token_id)

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)


def test_a_models_generation_config_cannot_change_what_is_sampled(tmp_path, tiny):
    """repetition_penalty, sequence_bias, min_new_tokens, forced_eos_token_id and friends in the model's
    generation_config change what `generate` samples, and nothing of what the engine samples."""
    tokenizer, plain = tiny
    path = build_tiny_model(tmp_path / "configured")
    configured = load_causal_lm(str(path), dtype="float32").eval()
    configured.generation_config.update(
        repetition_penalty=5.0, sequence_bias={(17,): 8.0, (40,): -8.0}, min_new_tokens=12, forced_eos_token_id=5,
        no_repeat_ngram_size=2, suppress_tokens=[3, 4], top_k=3, top_p=0.5, temperature=0.3,
    )
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    sampling = Sampling(12, 0.8)
    stop = stop_token_ids(tokenizer, plain)
    rollouts = []
    for lm in (plain, configured):
        torch.manual_seed(3)
        rollouts.append(sample(lm, query_ids, query_mask, sampling, stop, tokenizer.pad_token_id))
    assert torch.equal(rollouts[0].response_ids, rollouts[1].response_ids)
    assert torch.equal(rollouts[0].logprobs, rollouts[1].logprobs)
    generated = []
    for lm in (plain, configured):  # generate, by contrast, takes the config's settings
        torch.manual_seed(3)
        with torch.no_grad():
            generated.append(lm.generate(input_ids=query_ids, attention_mask=query_mask, do_sample=True,
                                         max_new_tokens=12, pad_token_id=tokenizer.pad_token_id))
    assert not torch.equal(generated[0], generated[1])


# --- LoRA folded into the weights -----------------------------------------------------------------------------


def lora_model(tiny_model):
    model = apply_lora(load_causal_lm(tiny_model, dtype="float32"), LoraSettings(r=4, alpha=8, dropout=0.0))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # a trained adapter changes the function
    return model.eval()


def test_lora_is_folded_while_sampling_and_the_weights_come_back_bit_identical(tiny_model, tiny):
    tokenizer, base = tiny
    model = lora_model(tiny_model)
    before = {n: (p.detach().clone(), p.data_ptr()) for n, p in model.named_parameters()}
    adapter_calls = []
    hooks = [m.register_forward_hook(lambda *a: adapter_calls.append(1))
             for n, m in model.named_modules() if n.endswith("lora_A.default")]
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    sampling = Sampling(10, 0.8)
    torch.manual_seed(4)
    rollout = sample(model, query_ids, query_mask, sampling, [], tokenizer.pad_token_id)
    assert not adapter_calls  # the adapter path did not run: its weights were in the base weights
    for hook in hooks:
        hook.remove()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][0]) and p.data_ptr() == before[name][1], name
    with torch.no_grad():
        unfolded, _ = forward_logprobs(model, rollout, sampling)  # the adapter applied layer by layer
        without, _ = forward_logprobs(base, rollout, sampling)
    torch.testing.assert_close(rollout.logprobs, unfolded, atol=1e-5, rtol=1e-5)
    assert (rollout.logprobs - without).abs().max() > 0.1  # the folded adapter did change the distribution


def test_folding_is_undone_when_sampling_fails(tiny_model):
    model = lora_model(tiny_model)
    weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    original = weight.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), folded_lora(model):
        assert not torch.equal(weight, original)
        raise RuntimeError("boom")
    assert torch.equal(weight, original)


def test_the_compiled_decode_step_samples_what_the_eager_one_does(tiny_model, tiny):
    tokenizer, _ = tiny
    model = lora_model(tiny_model)
    query_ids, query_mask = encode_prompts(tokenizer, PROMPTS)
    sampling = Sampling(8, 0.9, num_samples=2)
    rollouts = []
    for compile in (False, True):
        torch.manual_seed(5)
        rollouts.append(sample(model, query_ids, query_mask, sampling, [], tokenizer.pad_token_id, compile=compile))
    assert torch.equal(rollouts[0].response_ids, rollouts[1].response_ids)
    torch.testing.assert_close(rollouts[0].logprobs, rollouts[1].logprobs, atol=1e-5, rtol=1e-5)


# --- text in, text out ----------------------------------------------------------------------------------------


def test_generate_responses_gives_k_answers_per_prompt_in_prompt_order(tiny):
    tokenizer, lm = tiny
    answers = generate_responses(lm, tokenizer, PROMPTS, max_new_tokens=6, do_sample=True, num_samples=4,
                                 batch_size=8)
    assert len(answers) == 12 and len(set(answers)) > 3
    greedy = generate_responses(lm, tokenizer, PROMPTS, max_new_tokens=6)
    assert greedy == generate_responses(lm, tokenizer, PROMPTS[::-1], max_new_tokens=6)[::-1]
    with pytest.raises(ConfigError, match="num_samples"):
        generate_responses(lm, tokenizer, PROMPTS, do_sample=False, num_samples=2)
