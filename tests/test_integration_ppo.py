"""`rlhfkit ppo` on the bundled model, wired as a user runs it: an SFT adapter as the start (merged; the reference),
a reward model directory plus the toxicity scorer as rewards, the critic initialised from the reward model."""

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import REPO
from rlhfkit.cli import app
from rlhfkit.config import LoraSettings
from rlhfkit.data.jsonl import read_jsonl
from rlhfkit.rollout import generate_responses
from rlhfkit.models import DEFAULT_MODEL, apply_lora, load_causal_lm, load_tokenizer
from rlhfkit.reward import RewardModel

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_ppo_on_the_bundled_model_from_an_sft_adapter_with_a_reward_model_and_toxicity(tmp_path):
    # Stand-ins for the SFT and reward stages (their training is tested elsewhere): a LoRA adapter with non-zero
    # weights, so that merging it matters, and a reward model with a fresh head on the bundled backbone.
    torch.manual_seed(0)
    sft = apply_lora(load_causal_lm(DEFAULT_MODEL, dtype="float32"), LoraSettings(r=4))
    for name, p in sft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    sft.save_pretrained(tmp_path / "sft", save_embedding_layers=False)
    load_tokenizer(DEFAULT_MODEL).save_pretrained(tmp_path / "sft")
    RewardModel.from_base(DEFAULT_MODEL, max_length=256).save_pretrained(tmp_path / "rm")

    out = tmp_path / "ppo"
    args = ["ppo", "--config", str(REPO / "configs" / "ppo.yaml"), f"model={tmp_path / 'sft'}", f"output_dir={out}",
            f"rewards=[{{scorer: {tmp_path / 'rm'}, weight: 1.0}}, {{scorer: toxicity, weight: -2.0}}]",
            "steps=2", "batch_size=4", "mini_batch_size=2", "ppo_epochs=1", "sampling.max_new_tokens=12",
            "preview.num_prompts=1", "preview.max_new_tokens=12", "save_every=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "KL to the reference" in result.output

    rows = [r for _, r in read_jsonl(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward/reward", "reward/toxicity", "kl/ref", "value/explained_variance", "response/eos_rate"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-4)  # step 1 samples from the reference itself
    critic = load_file(out / "checkpoint-2" / "model_1.safetensors")
    assert any("lora_A" in k for k in critic) and any("head" in k for k in critic)

    # The PPO adapter names the merged SFT model it wrote as its base, so that peft loads it alone.
    policy = load_causal_lm(str(out), dtype="float32")
    assert policy.peft_config["default"].base_model_name_or_path == str((out / "base").resolve())
    answer = generate_responses(policy, load_tokenizer(str(out)), ["Who is Wren?"], max_new_tokens=8)
    assert isinstance(answer[0], str)
