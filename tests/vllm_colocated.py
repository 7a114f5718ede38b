"""Run by the vLLM virtualenv's interpreter (tests/test_vllm.py): the colocated mode (`sampling.vllm_mode: colocate`)
where vllm imports beside rlhfkit. An engine in this process on the bundled model (a float32 directory, argv[1]),
the model's last layer perturbed and pushed as full weights, samples drawn, and the log-prob gap to this process's
transformers forward printed as JSON: {"gap_max", "gap_mean", "version"}."""

import json
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.rollout import Sampling, encode_prompts, token_logprobs
from rlhfkit.rollout.vllm_backend import ColocatedClient, VLLMSampler


def main(model: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lm.model.layers[-1].parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with tempfile.TemporaryDirectory() as sync:
        sampler = VLLMSampler(ColocatedClient(model, max_lora_rank=8), sync)
        sampler.push(lm, version=1)
        query_ids, query_mask = encode_prompts(tokenizer, ["Who is Wren?", "What does the company sell?"])
        sampling = Sampling(8, temperature=0.7, num_samples=2)
        rollout = sampler.sample(query_ids, query_mask, sampling, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                 seed=0)
    with torch.no_grad():
        logits = lm(**rollout.inputs()).logits
    width = query_ids.shape[1]
    logits = logits[:, width - 1:width - 1 + rollout.response_ids.shape[1]]
    mask = rollout.response_mask.bool()
    gap = (token_logprobs(logits, rollout.response_ids, sampling) - rollout.logprobs).abs()[mask]
    print(json.dumps({"gap_max": gap.max().item(), "gap_mean": gap.mean().item(),
                      "version": sampler.client.health()["version"]}))


if __name__ == "__main__":
    main(sys.argv[1])
