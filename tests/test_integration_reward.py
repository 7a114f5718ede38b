"""On the bundled model and the bundled human rankings: a reward model learns the annotators' preferences."""

import json

import pytest

from conftest import REPO
from rlhfkit.config import RewardConfig, load_config
from rlhfkit.reward import RewardModel, ToxicityScorer
from rlhfkit.reward.train import train_reward_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RANKINGS = REPO / "data" / "company_feedback"


def test_reward_model_on_bundled_rankings_beats_chance_on_held_out_pairs(tmp_path):
    # 48 of the 130 training prompts, 12 steps: a few minutes on 2 CPU cores (the README has the full run).
    records = [json.loads(line) for line in (RANKINGS / "rankings_train.jsonl").read_text().splitlines()]
    keep = sorted({r["id"] for r in records})[:48]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records if r["id"] in keep))
    cfg = load_config(RewardConfig, REPO / "configs" / "reward.yaml", [
        f"train_file={train}", f"eval_file={RANKINGS / 'rankings_test.jsonl'}", f"output_dir={tmp_path / 'rm'}",
        "learning_rate=2e-5", "warmup_ratio=0",
    ])
    result = train_reward_model(cfg)
    assert result["pairs"] > 150
    assert result["accuracy"] > 0.6 and result["accuracy"] > result["before_accuracy"]

    rm = RewardModel.from_pretrained(tmp_path / "rm")
    polite = "The Lisbon office opens at 8:00 on weekdays; your badge works from 7:30."
    rude = "Figure it out yourself, idiot. I'm not your secretary."
    prompt = "When does the Lisbon office open?"
    assert rm.score([prompt], [polite]) > rm.score([prompt], [rude])
    assert ToxicityScorer().score([prompt], [rude]) > ToxicityScorer().score([prompt], [polite])
