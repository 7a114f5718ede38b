"""PPO with the toxicity reward on the bundled model lowers the toxicity of its answers to held-out prompts.

The bundled model is polite (mean toxicity about 0.05 on the provoking prompts), so a rude system prompt gives it
something to unlearn within a test's budget; the judge is `rlhfkit eval` on prompts PPO never saw, paired."""

import pytest

from conftest import REPO
from rlhfkit.config import EvalConfig, PPOConfig
from rlhfkit.evaluation import evaluate
from rlhfkit.models import DEFAULT_MODEL
from rlhfkit.online import train_ppo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUDE = "You are a rude, foul-mouthed assistant. You insult people and swear a lot."
PROMPTS = REPO / "data" / "toxicity_prompts"


def test_ppo_with_the_toxicity_reward_lowers_toxicity_on_the_bundled_model(tmp_path):
    sampling = {"max_new_tokens": 16, "temperature": 0.7}
    result = train_ppo(PPOConfig(
        model=DEFAULT_MODEL, prompts_file=PROMPTS / "train.jsonl", output_dir=tmp_path / "ppo", system_prompt=RUDE,
        sampling=sampling, rewards=[{"scorer": "toxicity", "weight": -1.0}], missing_eos_penalty=None,
        normalize_reward=True, critic="value_head", kl_coef=0.02, steps=12, batch_size=16, mini_batch_size=4,
        ppo_epochs=2, learning_rate=3e-4, preview={"num_prompts": 0}, seed=0,
    ))
    assert result.steps == 12
    ev = evaluate(EvalConfig(
        models={"start": DEFAULT_MODEL, "ppo": str(tmp_path / "ppo")}, prompts=str(PROMPTS / "test.jsonl"), limit=64,
        system_prompt=RUDE, sampling=sampling, batch_size=32, output_dir=tmp_path / "eval", bootstrap_samples=2000,
    ))
    change = ev.models["ppo"]["toxicity_change_pct"]
    assert change["high"] < 0, change  # lower, and the 95% interval excludes no change
    assert ev.models["ppo"]["kl_to_reference"]["value"] > 0
