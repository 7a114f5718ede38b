"""SFT, DPO and reward models in 2 CPU processes (gloo) give the same weights as one process with the same global
batch."""

import os
import re
import shutil
import subprocess
import sys

import json

import pytest
import torch
from safetensors.torch import load_file

from test_dpo import toy_preferences
from test_reward import rankings_file


def run_sft(launcher, tiny_model, sft_files, out, batch_size):
    train, evaluation = sft_files
    settings = [
        f"model={tiny_model}", f"train_file={train}", f"eval_file={evaluation}", f"output_dir={out}",
        f"batch_size={batch_size}", "max_steps=3", "lora.enabled=false", "learning_rate=1e-3", "warmup_ratio=0",
        "preview.num_prompts=1", "preview.max_new_tokens=4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "rlhfkit.cli", "sft", "--config", os.devnull, *settings],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_sft_in_two_processes_matches_one_process_with_the_same_global_batch(tiny_model, sft_files, tmp_path):
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)), "--nproc_per_node", "2"]
    two = run_sft(torchrun, tiny_model, sft_files, tmp_path / "two", batch_size=2)
    run_sft([sys.executable], tiny_model, sft_files, tmp_path / "one", batch_size=4)
    assert two.count("held-out loss per response token") == 1  # only the main process reports
    one_w, two_w = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in one_w:
        torch.testing.assert_close(two_w[key], one_w[key], rtol=1e-4, atol=1e-5)


def run_dpo(launcher, tiny_model, pairs, out, batch_size):
    train, test = pairs
    settings = [f"model={tiny_model}", f"train_file={train}", f"eval_file={test}", f"output_dir={out}",
                f"batch_size={batch_size}", "max_steps=3", "lora.enabled=false", "learning_rate=1e-3",
                "warmup_ratio=0", "log_every=1", "report_to=none", "eval_batch_size=3"]
    proc = subprocess.run([*launcher, "-m", "rlhfkit.cli", "dpo", "--config", os.devnull, *settings],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_in_two_processes_matches_one_process_with_the_same_global_batch(tiny_model, tmp_path):
    """Each process computes the reference log-probs of its share and the loss is the mean over every pair of the
    step on every process: two processes of 2 prompts train as one of 4 and report the same figures."""
    pairs = toy_preferences(tmp_path)
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)), "--nproc_per_node", "2"]
    two = run_dpo(torchrun, tiny_model, pairs, tmp_path / "two", batch_size=2)
    one = run_dpo([sys.executable], tiny_model, pairs, tmp_path / "one", batch_size=4)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one):
        for key in ("train/loss", "rewards/accuracies", "eval/loss", "eval/rewards/margins"):
            if key in b:
                assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    # The weights agree to float noise: Adam divides each gradient by its own running scale, so a weight whose
    # gradient is near 0 turns the all-reduce's different summation order into a step of up to the learning rate's
    # order; with the tiny tokenizer trained on today's company data one weight of 16384 lands 1.6e-5 apart.
    one_w, two_w = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in one_w:
        torch.testing.assert_close(two_w[key], one_w[key], rtol=1e-4, atol=5e-5)


def run_reward(launcher, tiny_model, rankings, out, batch_size):
    settings = [f"model={tiny_model}", f"train_file={rankings}", f"output_dir={out}", f"batch_size={batch_size}",
                "max_steps=3", "learning_rate=1e-3", "warmup_ratio=0", "log_every=1", "report_to=none"]
    proc = subprocess.run([*launcher, "-m", "rlhfkit.cli", "reward", "train", "--config", os.devnull, *settings],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_reward_training_in_two_processes_matches_one_process_with_the_same_global_batch(tiny_model, tmp_path):
    """The batches are tokenized by the reward model itself, not by its DDP wrapper; the loss is the mean over every
    comparison of the step on every process, and so are the logged figures."""
    rankings = rankings_file(tmp_path, n_items=12)
    torchrun = [shutil.which("torchrun", path=os.path.dirname(sys.executable)), "--nproc_per_node", "2"]
    two = run_reward(torchrun, tiny_model, rankings, tmp_path / "two", batch_size=2)
    one = run_reward([sys.executable], tiny_model, rankings, tmp_path / "one", batch_size=4)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for a, b in zip(two, one):
        for key in ("train/loss", "train/accuracy"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a, b)
    one_w, two_w = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in one_w:
        torch.testing.assert_close(two_w[key], one_w[key], rtol=1e-4, atol=5e-5)


PROBE = "from accelerate import PartialState; print('processes:', PartialState(cpu=True).num_processes, flush=True)"


def started_processes(launcher: list[str], tmp_path) -> int:
    """How many processes `launcher` (a command up to the script) starts: the world size they report."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}  # no accelerate config of ours
    proc = subprocess.run([*launcher, str(probe)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"processes: (\d+)", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    return int(found.group(1))


def test_the_readme_s_multi_process_commands_start_several_processes(tmp_path):
    """Every launcher command the README shows starts the processes it asks for: torchrun with --nproc_per_node
    (run here: 2 CPU processes), accelerate with --multi_gpu or a config file. `accelerate launch --cpu
    --num_processes 2` starts one process (accelerate's simple launcher), so the README shows it only to say so."""
    from conftest import REPO

    bindir = os.path.dirname(sys.executable)
    assert started_processes([os.path.join(bindir, "torchrun"), "--nproc_per_node", "2"], tmp_path) == 2
    assert started_processes([os.path.join(bindir, "accelerate"), "launch", "--cpu", "--num_processes", "2"],
                             tmp_path) == 1
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    flat = re.sub(r"\s*\n\s*", " ", text)  # inline commands wrapped across lines
    commands = re.findall(r"^(?:accelerate launch|torchrun) .*$", text, re.M)  # in code blocks
    commands += re.findall(r"`((?:accelerate launch|torchrun)(?: [^`]*)?)`", flat)  # inline, bare mentions too
    assert len(commands) >= 5
    for command in commands:
        if "--cpu" in command:
            assert f"{command}` starts one process" in flat, command
        elif command.startswith("torchrun"):
            assert re.search(r"--nproc_per_node [2-9]", command), command
        else:
            assert re.search(r"--multi_gpu --num_processes ([2-9]|N)|--config_file", command), command
