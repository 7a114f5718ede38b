"""What the trainers share (rlhfkit.runs): the optimizer step under fp16 loss scaling and its NaN guard, trackers,
metrics.jsonl across resumes, output directories."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from rlhfkit.errors import ConfigError, NonFiniteError, OutputError
from rlhfkit.runs import MetricsWriter, NonFiniteGuard, optimizer_step, prepare_output_dir, trackers


@pytest.fixture
def fp16_accelerator():
    """An Accelerator with a GradScaler on CPU (accelerate gives one only on GPUs; the scaler logic is the same)."""
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    accelerator.native_amp = True
    yield accelerator
    AcceleratorState._reset_state(True)


def linear_setup(accelerator):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, optimizer, scheduler


def step(accelerator, model, optimizer, scheduler, scale_input=1.0, loss_factor=1.0):
    loss = (model(torch.ones(2, 4) * scale_input) ** 2).mean() * loss_factor
    accelerator.backward(loss)
    return optimizer_step(accelerator, optimizer, scheduler, list(model.parameters()), 1.0, loss)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_an_overflowing_fp16_step_goes_through_the_grad_scaler_and_is_no_failure(fp16_accelerator):
    """The scaler skips the update and halves its scale; the next step is applied (before, a skip outside the scaler
    left the optimizer unscaled and the next step raised "unscale_() has already been called")."""
    model, optimizer, scheduler = linear_setup(fp16_accelerator)
    before = weights(model)
    outcome = step(fp16_accelerator, model, optimizer, scheduler, scale_input=300.0)  # fp16 gradients overflow
    assert outcome.ok and fp16_accelerator.optimizer_step_was_skipped
    assert fp16_accelerator.scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before))
    outcome = step(fp16_accelerator, model, optimizer, scheduler)
    assert outcome.ok and not fp16_accelerator.optimizer_step_was_skipped and outcome.grad_norm > 0
    assert not any(torch.equal(a, b) for a, b in zip(weights(model), before))
    assert scheduler.last_epoch == 2  # the schedule advances with every step, skipped or not


def test_a_nan_loss_is_a_failure_with_or_without_a_scaler(fp16_accelerator):
    model, optimizer, scheduler = linear_setup(fp16_accelerator)
    before = weights(model)
    assert not step(fp16_accelerator, model, optimizer, scheduler, loss_factor=float("nan")).ok
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before))
    assert step(fp16_accelerator, model, optimizer, scheduler).ok  # the scaler is ready for the next step

    AcceleratorState._reset_state(True)
    plain = Accelerator(cpu=True)
    model, optimizer, scheduler = linear_setup(plain)
    before = weights(model)
    assert not step(plain, model, optimizer, scheduler, loss_factor=float("nan")).ok
    finite_loss_nan_gradient = torch.sqrt(model(torch.ones(2, 4)) * 0).sum()  # 0, but d sqrt(u)/du at 0 is inf
    plain.backward(finite_loss_nan_gradient)
    outcome = optimizer_step(plain, optimizer, scheduler, list(model.parameters()), 1.0, finite_loss_nan_gradient)
    assert not outcome.ok  # without loss scaling nothing else guards against it
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before))
    assert step(plain, model, optimizer, scheduler).ok


def test_the_guard_warns_for_each_failure_and_stops_past_the_tolerated_count():
    guard = NonFiniteGuard(tolerated=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard.failed(3)
        with pytest.raises(NonFiniteError, match="stopped at step 7: 2 updates had NaN or Inf"):
            guard.failed(7)
    assert len(caught) == 2 and "step 3: NaN or Inf" in str(caught[0].message)


def test_trackers_are_checked_before_a_run_starts():
    assert trackers("tensorboard") == ["tensorboard"] and trackers("none") == [] and trackers([]) == []
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        trackers(["tensorbored"])
    from accelerate.tracking import get_available_trackers

    missing = next(t for t in ("wandb", "mlflow", "comet_ml", "aim") if t not in {str(a) for a in get_available_trackers()})
    with pytest.raises(ConfigError, match=f"report_to: {missing} is not installed here"):
        trackers(["tensorboard", missing])


def test_time_in_metrics_goes_on_across_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in
                            ({"step": 1, "time": 5.0}, {"step": 2, "time": 9.0}, {"step": 3, "time": 14.0})))
    writer = MetricsWriter(path, resumed_at=2)
    writer.write(3, {"x": 1.0})
    writer.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert 9.0 <= rows[-1]["time"] < 10.0  # from the last kept row's 9 s, not from 0


def test_an_output_dir_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    AcceleratorState._reset_state(True)
    with pytest.raises(OutputError, match=r"cannot create output_dir .*file/run: .*file is a file"):
        prepare_output_dir(Accelerator(cpu=True), tmp_path / "file" / "run", overwrite=False, resuming=False)
