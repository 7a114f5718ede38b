import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, LlamaForSequenceClassification

from rlhfkit.config import RewardConfig, load_config
from rlhfkit.data.preference import PreferenceItem
from rlhfkit.reward import (
    ClassifierReward,
    FunctionReward,
    RewardModel,
    ToxicityScorer,
    WeightedSum,
)
from rlhfkit.reward import train as train_module
from rlhfkit.reward.train import PreferenceBatch, bradley_terry_loss, preference_metrics, train_reward_model


def test_score_is_the_same_unpadded_left_padded_and_right_padded(tiny_model):
    model = RewardModel.from_base(tiny_model)
    enc = model.tokenize(["Where is HQ?", "Parking?"], ["Edinburgh, at 14 Example Street.", "Yes."])
    ids, mask = enc["input_ids"], enc["attention_mask"]  # right-padded
    alone = torch.stack([model(ids[i : i + 1, : mask[i].sum()], mask[i : i + 1, : mask[i].sum()]) for i in range(2)]).squeeze(-1)
    right = model(ids, mask)
    n = mask.sum(1)
    left_ids, left_mask = torch.full_like(ids, model.tokenizer.pad_token_id), torch.zeros_like(mask)
    for i in range(2):
        left_ids[i, ids.shape[1] - n[i] :], left_mask[i, ids.shape[1] - n[i] :] = ids[i, : n[i]], 1
    left = model(left_ids, left_mask)
    torch.testing.assert_close(right, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left, alone, rtol=1e-4, atol=1e-5)


def test_the_prefix_all_rows_share_is_computed_once_with_the_same_scores_and_gradients(tiny_model):
    model = RewardModel.from_base(tiny_model)
    enc = model.tokenize(["Where is HQ?", "Parking?", "Who is Wren?"], ["Edinburgh.", "Yes, behind it.", "A robot."])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    shared = model._shared_prefix(ids, mask)
    assert shared >= 4  # the chat template's opening at least
    seen = []
    hook = model.body.embed_tokens.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    try:
        scores = model(ids, mask)
    finally:
        hook.remove()
    assert seen == [(1, shared), (3, ids.shape[1] - shared)]

    def gradients(score_sum):
        model.zero_grad()
        score_sum.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = gradients(scores.sum())
    plain = model.classifier(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, 0]
    theirs = gradients(plain.sum())
    torch.testing.assert_close(scores, plain, rtol=1e-4, atol=1e-5)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, grad in theirs.items():
        torch.testing.assert_close(ours[name], grad, atol=1e-4 * grad.abs().max().item(), rtol=1e-3)


def test_with_gradient_checkpointing_a_training_forward_scores_every_row_whole(tiny_model):
    """Gradient checkpointing switches the cache off in training; the shared prefix must not be lost with it."""
    model = RewardModel.from_base(tiny_model)
    enc = model.tokenize(["Where is HQ?", "Parking?"], ["Edinburgh.", "Yes, behind it."])
    expected = model(enc["input_ids"], enc["attention_mask"]).detach()
    model.classifier.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.testing.assert_close(model(enc["input_ids"], enc["attention_mask"]), expected, rtol=1e-4, atol=1e-5)


def test_head_initialisation_and_no_dropout(tiny_model, tmp_path):
    config = AutoConfig.from_pretrained(tiny_model)
    config.attention_dropout = 0.5
    config.save_pretrained(tiny_model_with_dropout := tmp_path / "m")
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        src = Path(tiny_model) / f
        if src.exists():
            (tiny_model_with_dropout / f).write_bytes(src.read_bytes())
    model = RewardModel.from_base(str(tiny_model_with_dropout))
    assert type(model.classifier).__name__ == "LlamaForSequenceClassification"
    d = model.classifier.config.hidden_size
    assert model.classifier.score.bias is None  # Bradley-Terry cannot move a bias: transformers' bias-free head
    assert 0.5 < model.classifier.score.weight.std().item() * math.sqrt(d + 1) < 1.5
    model.train()
    enc = model.tokenize(["q"], ["a fairly long answer"])
    assert model(**enc).item() == model(**enc).item()  # dropout is off even in training mode


def test_bradley_terry_loss_against_a_hand_computation():
    rewards = torch.tensor([1.0, 0.2, -0.5, 0.3])
    batch = PreferenceBatch(
        input_ids=torch.zeros(4, 1), attention_mask=torch.ones(4, 1), chosen=torch.tensor([0, 0, 1]),
        rejected=torch.tensor([1, 2, 2]), margin=torch.tensor([0.0, 1.0, 0.0]), target=torch.ones(3),
        tie_a=torch.tensor([3]), tie_b=torch.tensor([1]), lengths=torch.zeros(4),
    )
    log_sigmoid = lambda x: -math.log(1 + math.exp(-x))  # noqa: E731
    tie = -0.5 * (log_sigmoid(0.1) + log_sigmoid(-0.1))
    expected = -(log_sigmoid(0.8) + log_sigmoid(1.5 - 1.0) + log_sigmoid(0.7)) + tie
    loss, n = bradley_terry_loss(rewards, batch)
    assert n == 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # soft labels: the first pair's vote share is 2/3, the expected loss over its label
    batch.target = torch.tensor([2 / 3, 1.0, 1.0])
    soft = -(2 / 3 * log_sigmoid(0.8) + 1 / 3 * log_sigmoid(-0.8) + log_sigmoid(1.5 - 1.0) + log_sigmoid(0.7)) + tie
    assert bradley_terry_loss(rewards, batch)[0].item() == pytest.approx(soft, rel=1e-6)


def test_preference_metrics_against_a_hand_computation():
    margins = torch.tensor([2.0, -1.0, 0.5, 3.0])
    m = preference_metrics(margins, bins=2)  # bins of confidence [0.5, 0.75) and [0.75, 1]
    s = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    conf = [s(2.0), 1 - s(-1.0), s(0.5), s(3.0)]  # 0.881, 0.731, 0.622, 0.953
    low = abs(0.5 - (conf[1] + conf[2]) / 2)  # one of the two low-confidence pairs is right
    high = abs(1.0 - (conf[0] + conf[3]) / 2)
    assert m["accuracy"] == 0.75 and m["mean_margin"] == pytest.approx(1.125)
    assert m["calibration_error"] == pytest.approx(0.5 * low + 0.5 * high)


def rankings_file(tmp_path, n_items=6):
    path = tmp_path / "rankings.jsonl"
    lines = []
    for i in range(n_items):
        completions = [f"Good answer {i}: the office opens at 8.", f"ok {i}", f"wrong {i}, it opens at noon", f"go away {i}"]
        for ann, ranks in (("a", [1, 2, 3, 4]), ("b", [1, 3, 2, 4])):
            lines.append(json.dumps({"id": str(i), "prompt": f"When does office {i} open?", "completions": completions,
                                     "ranks": ranks, "annotator": ann}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_training_forwards_each_batch_once_and_saves_a_normalised_model(tiny_model, tmp_path, monkeypatch):
    forwards = []
    real_forward = RewardModel.forward

    def counting_forward(self, input_ids, attention_mask):
        forwards.append(input_ids.shape[0])
        return real_forward(self, input_ids, attention_mask)

    monkeypatch.setattr(RewardModel, "forward", counting_forward)
    data = rankings_file(tmp_path)
    cfg = load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={data}", f"eval_file={data}",
                                           f"output_dir={tmp_path / 'rm'}", "batch_size=2", "epochs=2",
                                           "learning_rate=1e-2", "eval_batch_size=64", "log_every=1"])
    result = train_reward_model(cfg)
    training = forwards[1:7]  # after the first evaluation: 6 steps (3 per epoch), then normalisation and evaluation
    assert training == [8] * 6  # 2 prompts x 4 completions per forward, all 6 pairs (5 after majority) from them
    # it learned: the training loss fell (the untrained model may already rank all 5 pairs right, as it does with
    # some tiny tokenizers, so accuracy need only not fall)
    assert result["accuracy"] >= result["before_accuracy"]
    losses = [m["train/loss"] for m in map(json.loads, (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines())
              if "train/loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    monkeypatch.undo()

    saved = RewardModel.from_pretrained(tmp_path / "rm")
    items = [json.loads(line) for line in data.read_text().splitlines()[::2]]
    scores = saved.score([r["prompt"] for r in items for _ in range(4)], [c for r in items for c in r["completions"]])
    assert scores.std().item() == pytest.approx(1.0, abs=1e-4)  # the level is the logit's: no bias in `score`
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert {"eval/accuracy", "eval/mean_margin", "eval/calibration_error"} <= metrics[-1].keys()


def test_lora_reward_model_trains_and_saves_merged(tiny_model, tmp_path):
    data = rankings_file(tmp_path, n_items=2)
    cfg = load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={data}", f"output_dir={tmp_path / 'rm'}",
                                           "lora.enabled=true", "lora.r=4", "max_steps=2"])
    train_reward_model(cfg)
    assert not (tmp_path / "rm" / "adapter_config.json").exists()
    trained = RewardModel.from_pretrained(tmp_path / "rm")
    assert trained.score(["q"], ["a"]).shape == (1,)
    base = RewardModel.from_base(tiny_model)
    moved = [n for n, p in trained.classifier.model.named_parameters() if not torch.equal(p, base.classifier.model.get_parameter(n))]
    assert any("q_proj" in n for n in moved)  # the adapters trained and were merged into the saved weights


def classifier_dir(tmp_path, tiny_model, name, id2label):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels, config.id2label = 2, id2label
    config.label2id = {v: k for k, v in id2label.items()}
    model = LlamaForSequenceClassification(config)
    return model, AutoTokenizer.from_pretrained(tiny_model), tmp_path / name


def test_classifier_reward_picks_the_label_by_name_not_position(tiny_model, tmp_path):
    a, tok, path_a = classifier_dir(tmp_path, tiny_model, "a", {0: "nothate", 1: "hate"})
    b, _, path_b = classifier_dir(tmp_path, tiny_model, "b", {0: "hate", 1: "nothate"})
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.score.weight.copy_(a.score.weight.flip(0))  # same classifier, labels in the other order
    for model, path in ((a, path_a), (b, path_b)):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    texts = ["you are wonderful", "the office opens at 8", "x"]
    for output in ("probability", "logit"):
        sa = ClassifierReward(str(path_a), "nothate", output=output).score(texts, texts)
        sb = ClassifierReward(str(path_b), "nothate", output=output).score(texts, texts)
        torch.testing.assert_close(sa, sb)
    with pytest.raises(Exception, match=r"no label 'toxic'; its labels are \['hate', 'nothate'\]"):
        ClassifierReward(str(path_a), "toxic")


def test_sequence_classification_backbone_is_a_reward_model(tiny_model, tmp_path):
    model, tok, path = classifier_dir(tmp_path, tiny_model, "enc", {0: "LABEL_0", 1: "LABEL_1"})
    model.save_pretrained(path)
    tok.save_pretrained(path)
    rm = RewardModel.from_base(str(path))
    assert rm.classifier.config.num_labels == 1
    rm.save_pretrained(tmp_path / "saved")
    torch.testing.assert_close(RewardModel.from_pretrained(tmp_path / "saved").score(["q"], ["a"]), rm.score(["q"], ["a"]))


def test_toxicity_function_and_weighted_sum():
    texts = ["Shut up, you stupid idiot, figure it out yourself.", "The Lisbon office opens at 8:00 on weekdays."]
    tox = ToxicityScorer().score(texts, texts)
    assert tox[0] > 0.9 > 0.5 > tox[1]
    length = FunctionReward(lambda p, r: len(r.split()), name="words")
    total = WeightedSum([(-2.0, ToxicityScorer()), (0.1, length)])
    torch.testing.assert_close(total.score(texts, texts), -2.0 * tox + 0.1 * torch.tensor([9.0, 8.0]))
    assert set(total.components(texts, texts)) == {"toxicity", "words"}


def trained_reward_model(tiny_model, tmp_path, *overrides):
    data = rankings_file(tmp_path, n_items=4)
    cfg = load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={data}", f"output_dir={tmp_path / 'rm'}",
                                           "batch_size=2", "max_steps=2", "learning_rate=1e-2", *overrides])
    train_reward_model(cfg)
    return tmp_path / "rm"


TEXTS = (["Where is HQ?", "Parking?", "Holidays?"], ["Edinburgh, at 14 Example Street.", "Level -1.", "28 days a year."])


def test_a_saved_reward_model_gives_rlhfkit_s_scores_in_plain_transformers(tiny_model, tmp_path):
    """Plain `AutoModelForSequenceClassification` gives exactly rlhfkit's score (not the score minus a stored
    offset): the decoder's `score` layer has no bias, so normalisation folds only the scale into it."""
    from transformers import AutoModelForSequenceClassification

    path = trained_reward_model(tiny_model, tmp_path)
    ours = RewardModel.from_pretrained(path)
    enc = ours.tokenize(*TEXTS)
    logits = [AutoModelForSequenceClassification.from_pretrained(path)(**enc).logits[:, 0] for _ in range(2)]
    torch.testing.assert_close(logits[0], logits[1])  # the trained head is in the file, not drawn at random
    torch.testing.assert_close(logits[0].detach(), ours.score(*TEXTS), rtol=1e-5, atol=1e-5)
    assert json.loads((path / "config.json").read_text())["rlhfkit_reward"]["offset"] == 0.0


def test_a_reward_model_saved_with_an_offset_still_scores_with_it(tiny_model, tmp_path):
    """Reward models saved before the offset left (config.json's `rlhfkit_reward.offset`) load with their scores."""
    path = trained_reward_model(tiny_model, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["rlhfkit_reward"]["offset"] = 0.87463
    (path / "config.json").write_text(json.dumps(config))
    older = RewardModel.from_pretrained(path)
    torch.testing.assert_close(older.score(*TEXTS), older.raw_scores(*TEXTS) + 0.87463)
    older.save_pretrained(tmp_path / "again")
    torch.testing.assert_close(RewardModel.from_pretrained(tmp_path / "again").score(*TEXTS), older.score(*TEXTS))


def tiny_classifier(tmp_path, tiny_model, name, id2label, problem_type=None):
    """A Llama sequence classifier saved with its tokenizer (what TRL's RewardTrainer writes, with one label)."""
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_model)
    config.num_labels, config.id2label, config.problem_type = len(id2label), id2label, problem_type
    config.label2id = {v: k for k, v in id2label.items()}
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(tmp_path / name)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / name)
    return model.eval(), tmp_path / name


def test_a_trl_trained_reward_model_scores_as_a_reward_model_and_as_a_classifier(tiny_model, tmp_path):
    from rlhfkit.reward.scorers import RewardModelReward, load_scorer

    model, path = tiny_classifier(tmp_path, tiny_model, "trl-rm", {0: "LABEL_0"})
    rm = load_scorer(str(path))
    assert isinstance(rm, RewardModelReward)
    texts = [rm.model.tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                                   tokenize=False) for p, r in zip(*TEXTS)]
    expected = torch.stack([model(**rm.model.tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
                            for t in texts]).detach()
    torch.testing.assert_close(rm.score(*TEXTS), expected, rtol=1e-5, atol=1e-5)
    # named as a classifier, its one label gives the logit, or with :prob its sigmoid (never a constant softmax of 1)
    torch.testing.assert_close(load_scorer(f"hf:{path}:LABEL_0").score(TEXTS[1], TEXTS[1]),
                               model(**rm.model.tokenizer(TEXTS[1], return_tensors="pt", padding=True)).logits[:, 0].detach())
    prob = load_scorer(f"hf:{path}:LABEL_0:prob").score(TEXTS[1], TEXTS[1])
    assert prob.min() > 0 and prob.max() < 1 and len(set(prob.tolist())) == 3


def test_classifier_probabilities_follow_the_head_and_run_on_the_given_device(tiny_model, tmp_path):
    from rlhfkit.reward.scorers import load_scorer

    labels = {0: "toxic", 1: "insult"}
    multi, multi_path = tiny_classifier(tmp_path, tiny_model, "multi", labels, "multi_label_classification")
    single, single_path = tiny_classifier(tmp_path, tiny_model, "single", labels)
    scorer = ClassifierReward(str(multi_path), "toxic")
    logits = multi(**scorer.tokenizer(TEXTS[1], return_tensors="pt", padding=True)).logits.detach()
    torch.testing.assert_close(scorer.score(TEXTS[1], TEXTS[1]), logits[:, 0].sigmoid())
    torch.testing.assert_close(ClassifierReward(str(single_path), "toxic").score(TEXTS[1], TEXTS[1]),
                               single(**scorer.tokenizer(TEXTS[1], return_tensors="pt", padding=True)).logits.detach().softmax(-1)[:, 0])
    assert load_scorer(f"hf:{multi_path}:toxic:logit", device="meta").model.device.type == "meta"


def test_a_classifier_whose_config_has_no_pad_id_scores_batches_with_the_tokenizer_s(tiny_model, tmp_path):
    """config.json `pad_token_id: null` while the tokenizer has one: transformers refuses batches of more than one
    ("Cannot handle batch sizes > 1 if no padding token is defined"); the scorer gives it the tokenizer's pad id and
    scores each text as it would alone."""
    from rlhfkit.reward.scorers import load_scorer

    model, path = tiny_classifier(tmp_path, tiny_model, "no-pad", {0: "good", 1: "bad"})
    config = json.loads((path / "config.json").read_text())
    config["pad_token_id"] = None
    (path / "config.json").write_text(json.dumps(config))
    scorer = load_scorer(f"hf:{path}:good")
    alone = [model(**scorer.tokenizer([t], return_tensors="pt")).logits.softmax(-1)[0, 0].item() for t in TEXTS[1]]
    torch.testing.assert_close(scorer.score(TEXTS[0], TEXTS[1]), torch.tensor(alone), rtol=1e-5, atol=1e-5)


def test_a_reward_model_in_the_earlier_format_still_loads_with_its_scores(tiny_model, tmp_path):
    """rlhfkit 0.1 wrote the transformer, reward_head.safetensors and reward_model.json (gain, bias)."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    path = tmp_path / "old"
    backbone = AutoModel.from_pretrained(tiny_model)
    backbone.save_pretrained(path)
    RewardModel.from_base(tiny_model).tokenizer.save_pretrained(path)
    torch.manual_seed(1)
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, path / "reward_head.safetensors")
    (path / "reward_model.json").write_text(json.dumps({"kind": "scalar-head", "base_model": tiny_model, "gain": 2.5,
                                                        "bias": -0.3, "max_length": 512}))
    loaded = RewardModel.from_pretrained(path)
    enc = loaded.tokenize(*TEXTS)
    hidden = backbone(**enc).last_hidden_state[torch.arange(3), enc["attention_mask"].sum(-1) - 1]  # right-padded
    torch.testing.assert_close(loaded.score(*TEXTS), (2.5 * head(hidden).squeeze(-1) - 0.3).detach(), rtol=1e-5, atol=1e-5)


def kill_in_step_3(settings: list[str], out, monkeypatch) -> None:
    """Reward training into `out`, killed by its third loss computation (one per step: in step 3)."""
    calls, real = {"n": 0}, train_module.bradley_terry_loss

    def dies_in_step_3(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "bradley_terry_loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_reward_model(load_config(RewardConfig, None, [*settings, f"output_dir={out}"]))
    monkeypatch.undo()


def test_reward_training_resumes_to_the_same_model_as_an_uninterrupted_run(tiny_model, tmp_path, monkeypatch):
    """LoRA with dropout on, checkpoints every 2 steps, killed in step 3 (mid-epoch), resumed: same weights, same
    logged losses, and `time` going on from where the killed run was."""
    data = rankings_file(tmp_path, n_items=8)
    settings = [f"model={tiny_model}", f"train_file={data}", "batch_size=2", "max_steps=5", "save_every=2",
                "learning_rate=1e-2", "lora.enabled=true", "lora.r=4", "lora.dropout=0.2", "log_every=1"]
    train_reward_model(load_config(RewardConfig, None, [*settings, f"output_dir={tmp_path / 'whole'}"]))

    killed = tmp_path / "killed"
    kill_in_step_3(settings, killed, monkeypatch)
    assert [p.name for p in killed.glob("checkpoint-*")] == ["checkpoint-2"] and not (killed / "config.json").exists()
    train_reward_model(load_config(RewardConfig, None, [*settings, f"output_dir={killed}", "resume_from=latest"]))

    from safetensors.torch import load_file

    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    whole_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(r["step"], r["train/loss"]) for r in whole_rows]
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)


def test_a_run_resumed_between_two_logs_logs_what_an_uninterrupted_run_does(tiny_model, tmp_path, monkeypatch):
    """Logged every 3 steps, checkpointed every 2, killed in step 3: the resumed run's step-3 figures are the means
    over steps 1 to 3, as the uninterrupted run's, not over step 3 alone (the window is in the checkpoint)."""
    data = rankings_file(tmp_path, n_items=8)
    settings = [f"model={tiny_model}", f"train_file={data}", "batch_size=2", "max_steps=6", "save_every=2",
                "learning_rate=1e-2", "log_every=3", "report_to=none"]
    train_reward_model(load_config(RewardConfig, None, [*settings, f"output_dir={tmp_path / 'whole'}"]))
    killed = tmp_path / "killed"
    kill_in_step_3(settings, killed, monkeypatch)
    train_reward_model(load_config(RewardConfig, None, [*settings, f"output_dir={killed}", "resume_from=latest"]))

    def logged(run):
        return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in logged(killed)] == [3, 6]
    assert logged(killed) == logged(tmp_path / "whole")


def test_gradient_accumulation_trains_as_one_batch_of_the_same_size(tiny_model, tmp_path):
    """Batches of 2 prompts with 2 accumulation steps: the same steps, weights and logged figures as batches of 4
    (the loss of a step is the mean over all its comparisons)."""
    data = rankings_file(tmp_path, n_items=12)
    settings = [f"model={tiny_model}", f"train_file={data}", "max_steps=3", "learning_rate=1e-3", "warmup_ratio=0",
                "log_every=1", "report_to=none"]
    train_reward_model(load_config(RewardConfig, None, [*settings, "batch_size=4", f"output_dir={tmp_path / 'four'}"]))
    train_reward_model(load_config(RewardConfig, None, [*settings, "batch_size=2", "gradient_accumulation_steps=2",
                                                        f"output_dir={tmp_path / 'two'}"]))
    from safetensors.torch import load_file

    four, two = load_file(tmp_path / "four" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in four:
        torch.testing.assert_close(two[key], four[key], rtol=1e-4, atol=5e-5)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("four", "two")}
    assert [r["step"] for r in rows["two"]] == [r["step"] for r in rows["four"]] == [1, 2, 3]
    for a, b in zip(rows["two"], rows["four"]):
        assert a["train/accuracy"] == b["train/accuracy"] and a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)


def test_rankings_that_are_all_ties_are_refused_before_anything_is_written(tiny_model, tmp_path):
    from rlhfkit.errors import DataError

    data = tmp_path / "ties.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 1], "annotator": "x"}) + "\n")
    out = tmp_path / "rm"
    with pytest.raises(DataError, match=r"ties.jsonl: no comparisons: every ranking ties .* keep_ties: true"):
        train_reward_model(load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={data}",
                                                            f"output_dir={out}"]))
    assert not out.exists()
    good = rankings_file(tmp_path, n_items=2)
    with pytest.raises(DataError, match="no such file"):
        train_reward_model(load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={good}",
                                                            f"eval_file={tmp_path / 'typo.jsonl'}", f"output_dir={out}"]))
    assert not out.exists()
    train_reward_model(load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={good}",
                                                        f"output_dir={out}", "max_steps=1"]))  # the corrected rerun
    assert (out / "model.safetensors").is_file()
