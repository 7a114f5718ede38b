import json
import math

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit import sft as sft_module
from rlhfkit.config import SFTConfig, load_config
from rlhfkit.errors import OutputExistsError
from rlhfkit.models import load_causal_lm
from rlhfkit.sft import train_sft


def config(tiny_model, sft_files, output_dir, *overrides):
    train, evaluation = sft_files
    base = [
        f"model={tiny_model}", f"train_file={train}", f"eval_file={evaluation}", f"output_dir={output_dir}",
        "batch_size=4", "learning_rate=5e-3", "warmup_ratio=0", "log_every=1", "preview.num_prompts=0",
    ]
    return load_config(SFTConfig, None, base + list(overrides))


def adapter_weights(output_dir):
    return load_file(output_dir / "adapter_model.safetensors")


def test_sft_lowers_train_and_held_out_loss_and_writes_a_run_directory(tiny_model, sft_files, tmp_path):
    out = tmp_path / "run"
    result = train_sft(config(tiny_model, sft_files, out, "epochs=6", "lora.r=8", "learning_rate=2e-2", "preview.num_prompts=2", "preview.max_new_tokens=4"))
    assert result.steps == 24
    assert result.train_loss_last < result.train_loss_first
    assert result.eval_loss_after < result.eval_loss_before
    # the run directory: resolved config, metrics, TensorBoard, the adapter, checkpoints (2 kept), previews
    assert (out / "config.yaml").is_file() and (out / "adapter_config.json").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["step"] == 0 and "eval/loss" in metrics[0]
    assert sum("train/loss" in m for m in metrics) == 24 and sum("eval/loss" in m for m in metrics) == 7
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-24"]
    assert not list(out.glob(".*tmp"))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["model"] for s in samples] == ["reference", "before", "after"] * 2
    assert [p["prompt"] for p in result.previews] == [s["prompt"] for s in samples[::3]]
    # before and after, measured against the reference answers (the reference itself is not scored)
    assert samples[0]["scores"] == {} and set(samples[1]["scores"]) == set(samples[2]["scores"]) == {"rouge_l", "similarity"}
    for which in ("before", "after"):
        rows = [s["scores"] for s in samples if s["model"] == which]
        for key in ("rouge_l", "similarity"):
            assert result.preview_metrics[which][key] == pytest.approx(sum(r[key] for r in rows) / 2)
    # the saved adapter reproduces the trained model
    assert load_causal_lm(str(out)).peft_config["default"].r == 8


def test_existing_output_is_refused_untouched_unless_overwrite(tiny_model, sft_files, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        train_sft(config(tiny_model, sft_files, out, "max_steps=1"))
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    train_sft(config(tiny_model, sft_files, out, "max_steps=1", "overwrite=true"))
    assert not (out / "precious.txt").exists() and (out / "adapter_model.safetensors").is_file()


def kill_at_loss(n: int, cfg, monkeypatch) -> None:
    """SFT with `cfg`, killed by its n-th loss computation."""
    calls, real = {"n": 0}, sft_module.token_loss_sum

    def dies(model, batch):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(sft_module, "token_loss_sum", dies)
    with pytest.raises(KeyboardInterrupt):
        train_sft(cfg)
    monkeypatch.setattr(sft_module, "token_loss_sum", real)


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tiny_model, sft_files, tmp_path, monkeypatch):
    """With LoRA dropout on, killed in the middle of an epoch (step 3 of 4), resumed from checkpoint-2: the dropout
    masks and the data order of steps 3 to 7 must be those of the uninterrupted run."""
    settings = ["max_steps=7", "save_every=2", "gradient_accumulation_steps=2", "batch_size=2", "lora.dropout=0.1"]
    train_sft(config(tiny_model, sft_files, tmp_path / "whole", *settings))

    # Loss computations: 1 eval batch before training, 2 micro-batches per step: the 6th is step 3's first.
    kill_at_loss(6, config(tiny_model, sft_files, tmp_path / "killed", *settings), monkeypatch)
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()

    result = train_sft(config(tiny_model, sft_files, tmp_path / "killed", *settings, "resume_from=latest"))
    assert result.steps == 7
    whole, resumed = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "killed")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    whole_rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert losses == {r["step"]: r["train/loss"] for r in whole_rows if "train/loss" in r}
    times = [r["time"] for r in rows]
    assert times == sorted(times) and times[-1] > max(r["time"] for r in rows if r["step"] <= 2)  # time goes on


def test_a_run_resumed_between_two_logs_logs_what_an_uninterrupted_run_does(tiny_model, sft_files, tmp_path,
                                                                             monkeypatch):
    """Logged every 3 steps, checkpointed every 2, killed in step 3: the resumed run's step-3 loss is the mean over
    steps 1 to 3, as the uninterrupted run's, not over step 3 alone (the window is in the checkpoint)."""
    settings = ["max_steps=6", "save_every=2", "log_every=3", "eval_file="]
    train_sft(config(tiny_model, sft_files, tmp_path / "whole", *settings))
    kill_at_loss(3, config(tiny_model, sft_files, tmp_path / "killed", *settings), monkeypatch)  # 1 per step
    train_sft(config(tiny_model, sft_files, tmp_path / "killed", *settings, "resume_from=latest"))

    def logged(run):
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in logged(tmp_path / "killed")] == [3, 4, 6]  # every 3 steps and each epoch's end
    assert logged(tmp_path / "killed") == logged(tmp_path / "whole")


def test_a_run_refused_for_bad_input_leaves_nothing_behind(tiny_model, sft_files, tmp_path):
    from rlhfkit.errors import DataError, ModelNotFoundError

    out = tmp_path / "run"
    with pytest.raises(DataError, match="no such file"):
        train_sft(config(tiny_model, sft_files, out, "max_steps=1", f"eval_file={tmp_path / 'missing.jsonl'}"))
    with pytest.raises(ModelNotFoundError):
        train_sft(config(tiny_model, sft_files, out, "max_steps=1", f"model={tmp_path / 'no-model'}"))
    assert not out.exists()
    train_sft(config(tiny_model, sft_files, out, "max_steps=1"))  # the corrected rerun is not refused
    assert (out / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_gives_the_same_update_as_a_bigger_batch(tiny_model, sft_files, tmp_path):
    common = ["max_steps=3", "lora.enabled=false", "eval_file=", "learning_rate=1e-3"]
    train_sft(config(tiny_model, sft_files, tmp_path / "big", *common, "batch_size=4"))
    train_sft(config(tiny_model, sft_files, tmp_path / "accum", *common, "batch_size=2", "gradient_accumulation_steps=2"))
    big, accum = load_file(tmp_path / "big" / "model.safetensors"), load_file(tmp_path / "accum" / "model.safetensors")
    base = load_causal_lm(tiny_model).state_dict()
    for key in big:
        assert not torch.equal(big[key], base[key]) or "norm" in key
        # Summation order differs, and Adam divides by sqrt(v): for a weight whose gradient is near zero (a rare
        # token's embedding) float noise moves it by ~1e-5. A wrong loss normalisation moves every weight by ~1e-3.
        torch.testing.assert_close(accum[key], big[key], rtol=1e-4, atol=2e-5)


def test_merged_adapter_is_saved_as_full_weights(tiny_model, sft_files, tmp_path):
    out = tmp_path / "merged"
    train_sft(config(tiny_model, sft_files, out, "max_steps=2", "merge_adapter=true"))
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    merged = load_causal_lm(str(out))
    assert type(merged).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([[5, 6, 7]])
    assert not torch.allclose(merged(ids).logits, load_causal_lm(tiny_model)(ids).logits)


def test_a_nan_loss_skips_its_update_and_the_run_goes_on(tiny_model, sft_files, tmp_path, monkeypatch):
    import warnings

    calls, real = {"n": 0}, sft_module.token_loss_sum

    def nan_in_step_2(model, batch):
        calls["n"] += 1
        loss, n = real(model, batch)
        return (loss * float("nan") if calls["n"] == 3 else loss), n  # 1 eval batch, then one batch per step

    monkeypatch.setattr(sft_module, "token_loss_sum", nan_in_step_2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_sft(config(tiny_model, sft_files, tmp_path / "run", "max_steps=3", "lora.enabled=false"))
    assert result.steps == 3 and sum("step 2: NaN or Inf" in str(w.message) for w in caught) == 1
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "run" / "model.safetensors").values())
    from rlhfkit.errors import NonFiniteError

    calls["n"] = 0
    with pytest.raises(NonFiniteError, match="stopped at step 2"):
        train_sft(config(tiny_model, sft_files, tmp_path / "strict", "max_steps=3", "max_nonfinite_updates=0"))


def test_fp16_overflow_steps_are_skipped_by_the_grad_scaler_not_counted(tiny_model, sft_files, tmp_path, fp16_scalers):
    """accelerate gives a GradScaler only on GPUs; here one on CPU, with a scale that overflows the first steps."""
    result = train_sft(config(tiny_model, sft_files, tmp_path / "run", "max_steps=8", "max_nonfinite_updates=0",
                              "eval_file="))
    assert result.steps == 8 and fp16_scalers[0].get_scale() < 2.0**20  # some updates overflowed and were skipped
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["train/grad_norm"] != r["train/grad_norm"] or r["train/grad_norm"] == float("inf") for r in rows)
    assert math.isfinite(rows[-1]["train/grad_norm"])  # and later ones were applied
    assert all(torch.isfinite(w).all() for w in adapter_weights(tmp_path / "run").values())


def test_the_loss_from_the_kept_positions_equals_the_full_forward_s(tiny_model):
    """token_loss_sum gives vocabulary logits only where a labelled token is predicted: loss, token count and
    gradients as with every position's logits (rows of different lengths, responses at different offsets)."""
    from rlhfkit.data.chat import IGNORE_INDEX
    from rlhfkit.losses import causal_lm_loss

    model = load_causal_lm(tiny_model, dtype="float32")
    torch.manual_seed(0)
    input_ids = torch.randint(3, 200, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 8:] = input_ids[0, 8:]
    labels[1, 5:9] = input_ids[1, 5:9]
    labels[2, 10:] = input_ids[2, 10:]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    kept, n = sft_module.token_loss_sum(model, batch)
    kept.backward()
    kept_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    full, n_full = causal_lm_loss(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    full.backward()
    assert n == n_full == 10
    assert torch.allclose(kept, full, rtol=1e-6, atol=1e-6)
    assert all(torch.allclose(a, p.grad, rtol=1e-5, atol=1e-7) for a, p in zip(kept_grads, model.parameters()))
    assert "logits_to_keep" in sft_module.keep_logits(model, 4, 11, 12)  # the tiny Llama takes the keyword
