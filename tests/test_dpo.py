"""DPO on tiny models: the loss and its variants against hand computations, learning a toy preference, exact resume,
and bad input refused with one error line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import COMPANY_TEST, COMPANY_TRAIN, REPO, build_tiny_model
from rlhfkit import dpo as dpo_module
from rlhfkit.config import DPOConfig, load_config
from rlhfkit.data.chat import TokenizedExample
from rlhfkit.data.preference import load_preference_items
from rlhfkit.dpo import collate_items, preference_loss, sequence_logps, tokenize_items, train_dpo
from rlhfkit.errors import ConfigError
from rlhfkit.models.policy import PolicyModel
from test_cli import assert_one_error_line, run_main

RANKINGS = REPO / "data" / "company_feedback" / "rankings_train.jsonl"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(model, train, output_dir, *overrides, eval_file=None):
    base = [f"model={model}", f"train_file={train}", f"output_dir={output_dir}", "report_to=none", "log_every=1",
            "warmup_ratio=0"]
    if eval_file is not None:
        base.append(f"eval_file={eval_file}")
    return load_config(DPOConfig, None, base + list(overrides))


def metric_rows(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def hand_logp(model, tokenizer, prompt: str, response: str) -> float:
    """log pi(response | prompt) token by token: the rendered conversation's tokens after the rendered prompt's."""
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                               {"role": "assistant", "content": response}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(prompt_ids), len(ids)))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_ipo_and_smoothed_losses_match_a_hand_computation(tiny_model, tmp_path):
    """pi_theta and pi_ref are two different tiny models; log-probs are summed over the response's tokens only."""
    prompt, y_w, y_l = "Where is the head office?", "In Edinburgh, by the canal.", "Lisbon."
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": y_w, "rejected": y_l}])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    reference = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "ref", seed=1))

    (item,) = tokenize_items(pairs, tokenizer, 512, None, soft_labels=False)
    batch = collate_items([item], tokenizer.pad_token_id)
    with torch.no_grad():
        pi = sequence_logps(PolicyModel(policy), **batch.tokens())
        ref = sequence_logps(PolicyModel(reference), **batch.tokens())
    hand = {name: [hand_logp(m, tokenizer, prompt, y) for y in (y_w, y_l)] for name, m in (("pi", policy), ("ref", reference))}
    w, l = batch.chosen, batch.rejected
    assert [pi[w].item(), pi[l].item()] == pytest.approx(hand["pi"], rel=1e-5)
    assert [ref[w].item(), ref[l].item()] == pytest.approx(hand["ref"], rel=1e-5)

    beta = 0.3
    h = (hand["pi"][0] - hand["ref"][0]) - (hand["pi"][1] - hand["ref"][1])
    assert abs(beta * h) > 0.05  # the two models disagree enough for the variants to differ

    def loss(kind, **kwargs):
        losses, rw, rl = preference_loss(pi[w], pi[l], ref[w], ref[l], beta, kind, **kwargs)
        return losses.item(), rw.item(), rl.item()

    # float32 log-probs of ~-200 nats: differences of them are good to ~1e-5 nats
    approx = lambda x: pytest.approx(x, rel=1e-4, abs=1e-4)  # noqa: E731
    dpo, r_w, r_l = loss("sigmoid")
    assert dpo == approx(-log_sigmoid(beta * h))
    assert r_w == approx(beta * (hand["pi"][0] - hand["ref"][0]))
    assert r_l == approx(beta * (hand["pi"][1] - hand["ref"][1]))
    assert loss("ipo")[0] == approx((h - 1 / (2 * beta)) ** 2)
    eps = 0.2
    assert loss("sigmoid", label_smoothing=eps)[0] == approx(
        -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h))
    # a soft label q = 2/3 is the expected loss over the pair's label; smoothing then moves q towards 1/2
    q = torch.tensor([2 / 3])
    assert loss("sigmoid", target=q)[0] == approx(
        -2 / 3 * log_sigmoid(beta * h) - 1 / 3 * log_sigmoid(-beta * h))
    q_eps = 2 / 3 * (1 - eps) + 1 / 3 * eps
    assert loss("ipo", target=q, label_smoothing=eps)[0] == approx(
        q_eps * (h - 1 / (2 * beta)) ** 2 + (1 - q_eps) * (h + 1 / (2 * beta)) ** 2)


def test_ipo_averages_each_completion_s_log_ratio_over_its_tokens_by_default_as_trl_does(tmp_path):
    """TRL 1.16 and the IPO authors' code: h = log-ratio(y_w) / |y_w| - log-ratio(y_l) / |y_l|, the default here;
    `ipo_length_normalize=false` keeps the summed log-ratios. By hand: log-ratios +2 over 4 tokens and -2 over 2,
    beta 0.5 (margin 1/(2 beta) = 1): per token h = 0.5 + 1 = 1.5, loss 0.25; summed h = 4, loss 9."""
    pi, ref = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0])
    lengths = torch.tensor([4.0, 2.0])
    losses, r_w, r_l = preference_loss(pi[:1], pi[1:], ref[:1], ref[1:], 0.5, "ipo", lengths=(lengths[:1], lengths[1:]))
    assert losses.item() == pytest.approx(0.25)
    assert (r_w.item(), r_l.item()) == pytest.approx((1.0, -1.0))  # implicit rewards: beta x the summed log-ratio
    assert preference_loss(pi[:1], pi[1:], ref[:1], ref[1:], 0.5, "ipo")[0].item() == pytest.approx(9.0)
    q = torch.tensor([0.75])  # a soft label: the expectation over the pair's label, per-token h alike
    assert preference_loss(pi[:1], pi[1:], ref[:1], ref[1:], 0.5, "ipo", target=q, lengths=(lengths[:1], lengths[1:])
                           )[0].item() == pytest.approx(0.75 * 0.5**2 + 0.25 * 2.5**2)

    # the run's default, through the held-out figures: each completion's own token count (its labelled tokens)
    cfg = DPOConfig(train_file=tmp_path / "pairs.jsonl", output_dir=tmp_path / "out", loss="ipo", beta=0.5)
    assert cfg.ipo_length_normalize
    items = [dpo_module.TokenizedItem([TokenizedExample([1] * 9, [-100] * 5 + [7] * 4),
                                       TokenizedExample([1] * 7, [-100] * 5 + [7] * 2)], [(0, 1)], [1.0])]
    assert dpo_module.held_out_metrics(pi, ref, items, cfg)["loss"] == pytest.approx(0.25)
    summed = cfg.model_copy(update={"ipo_length_normalize": False})
    assert dpo_module.held_out_metrics(pi, ref, items, summed)["loss"] == pytest.approx(9.0)


def test_consolidated_rankings_carry_their_vote_share_as_the_soft_target(tiny_model, tmp_path):
    ranking = {"id": "q", "prompt": "Which office is biggest?", "completions": ["Edinburgh.", "Lisbon.", "Bristol."]}
    rankings = write_jsonl(tmp_path / "rankings.jsonl", [
        ranking | {"ranks": [1, 2, 3], "annotator": "a"},
        ranking | {"ranks": [1, 3, 2], "annotator": "b"},
        ranking | {"ranks": [2, 1, 2], "annotator": "c"},
    ])
    (item,) = load_preference_items(rankings)
    shares = dict(zip(item.pairs, item.shares))
    # E over L: a, b for, c against: 2/3. E over B: a, b for, c ties: (2 + 1/2)/3. L and B: a for, b against, c for.
    assert shares == pytest.approx({(0, 1): 2 / 3, (0, 2): 5 / 6, (1, 2): 2 / 3})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert tokenize_items(rankings, tokenizer, 512, None, soft_labels=False)[0].targets == [1.0, 1.0, 1.0]
    soft = tokenize_items(rankings, tokenizer, 512, None, soft_labels=True)[0]
    assert soft.targets == pytest.approx([shares[p] for p in soft.pairs])


def toy_preferences(tmp_path):
    """Chosen answers open with "Sure!", rejected ones with "No.": a preference DPO can learn and carry to held-out
    prompts within a few dozen steps."""
    def pairs(source, n):
        rows = [json.loads(line) for line in source.read_text().splitlines()[:n]]
        return [{"prompt": r["prompt"], "chosen": "Sure! " + r["response"][:60], "rejected": "No. " + r["response"][:60]}
                for r in rows]
    return (write_jsonl(tmp_path / "toy_train.jsonl", pairs(COMPANY_TRAIN, 16)),
            write_jsonl(tmp_path / "toy_test.jsonl", pairs(COMPANY_TEST, 8)))


def test_dpo_learns_a_toy_preference_and_saves_an_adapter_plain_peft_loads(tiny_model, tmp_path):
    from peft import PeftModel

    train, test = toy_preferences(tmp_path)
    out = tmp_path / "run"
    result = train_dpo(config(tiny_model, train, out, "max_steps=24", "batch_size=4", "learning_rate=5e-3",
                              "eval_every=8", "lora.r=8", eval_file=test))
    before, after = result.eval_before, result.eval_after
    # step 0: the policy is the reference, so every margin is 0 and the loss log 2
    assert before["rewards/margins"] == 0 and before["rewards/accuracies"] == 0
    assert before["loss"] == pytest.approx(math.log(2))
    assert after["rewards/accuracies"] == 1.0 and after["rewards/margins"] > 0.3 and after["loss"] < 0.55
    assert after["rewards/chosen"] > after["rewards/rejected"]
    rows = metric_rows(out)
    assert rows[0]["step"] == 0 and rows[0]["eval/loss"] == pytest.approx(math.log(2))
    assert rows[1]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)  # the first update's loss, before it
    held_out = [r for r in rows if "eval/rewards/margins" in r]
    assert [r["step"] for r in held_out] == [0, 8, 16, 24]
    margins = [r["eval/rewards/margins"] for r in held_out]
    assert margins[0] == 0 and min(margins[1:]) > 0.3  # learnt within the first 8 steps, and kept
    assert all(k in rows[-2] for k in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"))
    # the output: a LoRA adapter on the starting model, loaded by plain peft
    lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out)
    assert lm.peft_config["default"].r == 8
    assert (out / "config.yaml").is_file() and (out / "checkpoint-24" / dpo_module.REFERENCE_FILE).is_file()


def test_cli_full_fine_tuning_with_ipo_starts_from_the_reference_and_saves_full_weights(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    train, test = toy_preferences(tmp_path)
    out = tmp_path / "run"
    ran = CliRunner().invoke(app, ["dpo", f"model={tiny_model}", f"train_file={train}", f"eval_file={test}",
                                   f"output_dir={out}", "max_steps=4", "lora.enabled=false", "loss=ipo", "beta=0.5",
                                   "learning_rate=1e-3", "log_every=1", "report_to=none"])
    assert ran.exit_code == 0, ran.output
    assert "held-out pairs: implicit-reward accuracy 0.000 ->" in ran.output and "4 steps" in ran.output
    rows = metric_rows(out)
    assert rows[0]["eval/loss"] == pytest.approx(1.0)  # (0 - 1/(2 beta))^2 with h = 0
    # the first step's loss is before any update: h = 0 up to float32 rounding of the two forwards (the reference
    # log-probs come from differently padded batches), which reaches ~1e-5 on some draws of the toy pairs
    assert rows[1]["train/loss"] == pytest.approx(1.0, abs=1e-4)
    assert rows[-1]["step"] == 4 and rows[-1]["eval/rewards/margins"] > 0
    AutoModelForCausalLM.from_pretrained(out)  # full weights in HF format
    assert not (out / "adapter_config.json").exists()


def test_a_killed_run_resumes_to_the_same_weights_and_metrics_as_an_uninterrupted_one(tiny_model, tmp_path, monkeypatch):
    """Killed in step 3 (of 7, two micro-batches a step), resumed from checkpoint-2 with the reference log-probs the
    checkpoint kept (never recomputed): the same adapter, training and held-out figures as a run never stopped."""
    rankings = write_jsonl(tmp_path / "rankings.jsonl", [json.loads(line) for line in RANKINGS.read_text().splitlines()[:40]])
    train, test = toy_preferences(tmp_path)
    settings = ["max_steps=7", "save_every=2", "batch_size=2", "gradient_accumulation_steps=2", "learning_rate=5e-3",
                "eval_every=100", "soft_labels=true"]
    whole = train_dpo(config(tiny_model, rankings, tmp_path / "whole", *settings, eval_file=test))

    calls = {"n": 0}
    real = dpo_module.preference_loss

    def dies_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 1: held-out figures at step 0; 2 to 5: steps 1 and 2; 6: step 3's first micro-batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_module, "preference_loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(config(tiny_model, rankings, tmp_path / "killed", *settings, eval_file=test))
    monkeypatch.setattr(dpo_module, "preference_loss", real)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("the reference log-probs were recomputed")

    monkeypatch.setattr(dpo_module, "reference_logps", must_not_run)
    resumed = train_dpo(config(tiny_model, rankings, tmp_path / "killed", *settings, "resume_from=latest", eval_file=test))
    assert resumed.steps == 7
    a, b = load_file(tmp_path / "whole" / "adapter_model.safetensors"), load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    killed_rows, whole_rows = metric_rows(tmp_path / "killed"), metric_rows(tmp_path / "whole")
    assert [r["step"] for r in killed_rows] == [r["step"] for r in whole_rows] == [0, 1, 2, 3, 4, 5, 6, 7, 7]
    for k, w in zip(killed_rows, whole_rows):
        assert k.keys() == w.keys()
        assert {key: k[key] for key in k if key != "time"} == pytest.approx({key: w[key] for key in w if key != "time"})
    assert resumed.eval_before == whole.eval_before
    assert resumed.eval_after == pytest.approx(whole.eval_after)



def test_a_run_resumed_between_two_logs_logs_what_an_uninterrupted_run_does(tiny_model, tmp_path, monkeypatch):
    """Logged every 3 steps, checkpointed every 2, killed in step 3: the resumed run's step-3 figures are the means
    over the pairs of steps 1 to 3, as the uninterrupted run's, not over step 3's alone (the window is in the
    checkpoint)."""
    rankings = write_jsonl(tmp_path / "rankings.jsonl", [json.loads(line) for line in RANKINGS.read_text().splitlines()[:40]])
    settings = ["max_steps=6", "save_every=2", "log_every=3", "batch_size=2", "learning_rate=5e-3"]
    train_dpo(config(tiny_model, rankings, tmp_path / "whole", *settings))
    calls, real = {"n": 0}, dpo_module.preference_loss

    def dies_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # one loss a step, no held-out set
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_module, "preference_loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(config(tiny_model, rankings, tmp_path / "killed", *settings))
    monkeypatch.setattr(dpo_module, "preference_loss", real)
    train_dpo(config(tiny_model, rankings, tmp_path / "killed", *settings, "resume_from=latest"))
    killed, whole = metric_rows(tmp_path / "killed"), metric_rows(tmp_path / "whole")
    assert [r["step"] for r in killed] == [r["step"] for r in whole] and killed[0]["step"] == 3
    for k, w in zip(killed, whole):
        assert {key: k[key] for key in k if key != "time"} == {key: w[key] for key in w if key != "time"}


def test_bad_input_is_one_error_line_with_status_2(tiny_model, tmp_path, capsys, monkeypatch):
    cli = lambda *args: run_main(capsys, monkeypatch, "dpo", f"model={tiny_model}", "report_to=none", *args)  # noqa: E731
    good, _ = toy_preferences(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + '{"prompt": "p", "chosen": "a"\n')
    out = tmp_path / "out"
    assert_one_error_line(cli(f"train_file={bad}", f"output_dir={out}"), "bad.jsonl:17:")
    assert not out.exists()
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_one_error_line(cli(f"train_file={good}", f"output_dir={out}"), "already holds results", "overwrite=true")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    with pytest.raises(ConfigError, match="lora.dropout: DPO trains without dropout"):
        config(tiny_model, good, tmp_path / "o2", "lora.dropout=0.1")
    assert config(tiny_model, good, tmp_path / "o2", "lora.r=4").lora.dropout == 0  # DPO's default, not LoRA's


def test_the_shipped_config_parses():
    cfg = load_config(DPOConfig, REPO / "configs" / "dpo.yaml")
    assert cfg.train_file.name == "rankings_train.jsonl" and cfg.eval_file.name == "rankings_test.jsonl"
    with pytest.raises(ConfigError, match="loss"):
        load_config(DPOConfig, REPO / "configs" / "dpo.yaml", ["loss=hinge"])
