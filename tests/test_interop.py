"""Every kind of rlhfkit output loads in plain transformers, peft and TRL, in a process that never imports rlhfkit,
and computes there what it computes in rlhfkit; data in TRL's formats trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import COMPANY_TRAIN
from rlhfkit.config import PPOConfig, RewardConfig, SFTConfig, load_config
from rlhfkit.models.loading import load_causal_lm
from rlhfkit.online import train_ppo
from rlhfkit.reward.model import RewardModel
from rlhfkit.reward.scorers import FunctionReward
from rlhfkit.reward.train import train_reward_model
from rlhfkit.sft import train_sft

IDS = [[5, 17, 33, 2, 80, 41]]
PROMPTS, RESPONSES = ["Where is HQ?", "Parking?"], ["Edinburgh, at 14 Example Street.", "Level -1."]

# Loads what the test names with the ecosystem's own entry points and prints what they compute.
PLAIN_LOADER = r"""
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.data_utils import apply_chat_template

job = json.loads(sys.argv[1])
out = {}
with torch.no_grad():
    for name, path in job["adapters"].items():
        out[name] = AutoPeftModelForCausalLM.from_pretrained(path)(torch.tensor(job["ids"])).logits[0, -1].tolist()
    for name, path in job["full"].items():
        out[name] = AutoModelForCausalLM.from_pretrained(path)(torch.tensor(job["ids"])).logits[0, -1].tolist()
    # a reward model as TRL's GRPO/RLOO trainers load and call it
    path = job["reward_model"]
    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1), AutoTokenizer.from_pretrained(path)
    texts = [apply_chat_template({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]},
                                 tokenizer)["text"] for p, r in zip(job["prompts"], job["responses"])]
    inputs = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    out["reward"] = model(**inputs).logits[:, 0].tolist()
    out["reward_config"] = model.config.to_dict()
assert not any(m == "rlhfkit" or m.startswith("rlhfkit.") for m in sys.modules), "rlhfkit was imported"
print(json.dumps(out))
"""


@pytest.fixture
def bundled_alias_is_the_tiny_model(tiny_model, tmp_path, monkeypatch):
    """The alias smollm2-135m-instruct resolves to a converted copy of the tiny model in a private cache."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model, cache / "models" / "smollm2-135m-instruct")
    monkeypatch.setenv("RLHFKIT_CACHE", str(cache))
    return cache


def last_logits(name: str) -> list[float]:
    with torch.no_grad():
        return load_causal_lm(name, dtype="float32")(torch.tensor(IDS)).logits[0, -1].tolist()


def test_every_output_loads_in_plain_transformers_peft_and_trl(bundled_alias_is_the_tiny_model, tmp_path):
    sft_common = ["model=smollm2-135m-instruct", f"train_file={COMPANY_TRAIN}", "max_steps=2", "batch_size=4",
                  "learning_rate=5e-2", "preview.num_prompts=0"]
    sft, merged = tmp_path / "sft", tmp_path / "sft-merged"
    train_sft(load_config(SFTConfig, None, [*sft_common, f"output_dir={sft}"]))
    train_sft(load_config(SFTConfig, None, [*sft_common, f"output_dir={merged}", "merge_adapter=true"]))
    assert json.loads((sft / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        (bundled_alias_is_the_tiny_model / "models" / "smollm2-135m-instruct").resolve())

    def ppo(out, **settings):
        cfg = PPOConfig.model_validate(dict(
            model=str(sft), prompts_file=str(COMPANY_TRAIN), output_dir=str(out), rewards=[{"scorer": "toxicity"}],
            steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1, learning_rate=5e-2, critic="value_head",
            sampling={"max_new_tokens": 4}, preview={"num_prompts": 0}, **settings))
        train_ppo(cfg, FunctionReward(lambda p, r: float(len(r)), name="length"))
        return out

    ppo_adapter, ppo_full = ppo(tmp_path / "ppo"), ppo(tmp_path / "ppo-full", lora={"enabled": False})
    rm_path = tmp_path / "rm"
    rankings = tmp_path / "pairs.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": "no idea"}) + "\n"
                                for p, r in zip(PROMPTS, RESPONSES)))
    train_reward_model(load_config(RewardConfig, None, ["model=smollm2-135m-instruct", f"train_file={rankings}",
                                                        f"output_dir={rm_path}", "max_steps=2", "learning_rate=1e-2"]))

    # rlhfkit's view, before the SFT directory moves away (the PPO adapter must not need it)
    expected = {name: last_logits(str(path)) for name, path in
                (("sft", sft), ("sft_merged", merged), ("ppo", ppo_adapter), ("ppo_full", ppo_full))}
    assert expected["ppo"] != expected["sft"]  # PPO moved the policy: the comparison below can tell them apart
    rm = RewardModel.from_pretrained(rm_path)
    expected_reward = rm.score(PROMPTS, RESPONSES)
    shutil.move(sft, tmp_path / "sft-moved")

    job = {"ids": IDS, "adapters": {"sft_adapter": str(tmp_path / "sft-moved"), "ppo": str(ppo_adapter)},
           "full": {"sft_merged": str(merged), "ppo_full": str(ppo_full)}, "reward_model": str(rm_path),
           "prompts": PROMPTS, "responses": RESPONSES}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_LOADER, json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, ours in (("sft_adapter", "sft"), ("sft_merged", "sft_merged"), ("ppo", "ppo"), ("ppo_full", "ppo_full")):
        torch.testing.assert_close(torch.tensor(plain[name]), torch.tensor(expected[ours]), rtol=1e-4, atol=1e-4)
    assert plain["reward_config"]["architectures"] == ["LlamaForSequenceClassification"]
    assert len(plain["reward_config"]["id2label"]) == 1
    torch.testing.assert_close(torch.tensor(plain["reward"]), expected_reward, rtol=1e-4, atol=1e-4)  # no offset


def test_data_in_trl_formats_trains_sft_and_a_reward_model(tiny_model, tmp_path):
    """SFT on prompt/completion, conversational prompt/completion and `messages` with system and tool turns; a
    reward model on conversational pairs with an implicit prompt, read from a directory saved by `datasets`."""
    import datasets

    from rlhfkit.data.chat import IGNORE_INDEX
    from rlhfkit.models.loading import load_tokenizer
    from rlhfkit.sft import tokenize_examples

    user = {"role": "user", "content": "How many holiday days do I get?"}
    sft_rows = [
        {"prompt": "Where is HQ?", "completion": "Edinburgh."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Parking?"}],
         "completion": [{"role": "assistant", "content": "Level -1."}]},
        {"messages": [user, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "hr"}}]},
                      {"role": "tool", "name": "hr", "content": "28"}, {"role": "assistant", "content": "28 days."}]},
    ]
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in sft_rows))
    tokenizer = load_tokenizer(tiny_model)
    tool_example = tokenize_examples(sft_file, tokenizer, 256, None)[2]
    learned = tokenizer.decode([t for t, label in zip(tool_example.input_ids, tool_example.labels) if label != IGNORE_INDEX])
    assert "28 days." in learned and "tool" not in learned and "holiday" not in learned  # the answers only
    result = train_sft(load_config(SFTConfig, None, [f"model={tiny_model}", f"train_file={sft_file}", "max_steps=2",
                                                     "batch_size=3", f"output_dir={tmp_path / 'sft'}", "preview.num_prompts=0"]))
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.train_loss_last))

    def turn(text):
        return [user, {"role": "assistant", "content": text}]

    pairs = [{"chosen": turn(f"You get 28 days ({i})."), "rejected": turn(f"No idea ({i}).")} for i in range(4)]
    datasets.Dataset.from_list(pairs).save_to_disk(tmp_path / "prefs")
    metrics = train_reward_model(load_config(RewardConfig, None, [
        f"model={tiny_model}", f"train_file={tmp_path / 'prefs'}", f"eval_file={tmp_path / 'prefs'}",
        f"output_dir={tmp_path / 'rm'}", "max_steps=2", "learning_rate=1e-2"]))
    assert metrics["pairs"] == 4.0  # all four read, the shared user turn as their prompt
