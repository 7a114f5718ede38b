import json
import subprocess
import sys

from typer.testing import CliRunner

from rlhfkit.cli import app

runner = CliRunner()


def test_bad_config_prints_the_problem_without_a_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("train_file: t.jsonl\noutput_dir: o\nepochz: 3\n")
    proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "sft", "--config", str(config)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "epochz: unknown setting" in proc.stderr and "Traceback" not in proc.stderr


def test_malformed_data_names_file_and_line(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rlhfkit.cli", "sft", "--config", "/dev/null", f"model={tiny_model}",
         f"train_file={data}", f"output_dir={tmp_path / 'o'}"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and f"{data}:2: invalid JSON" in proc.stderr.replace("\n", "")


def test_sft_command_trains_and_reports(tiny_model, sft_files, tmp_path):
    train, evaluation = sft_files
    result = runner.invoke(app, ["sft", "--config", "/dev/null", f"model={tiny_model}", f"train_file={train}",
                                 f"eval_file={evaluation}", f"output_dir={tmp_path / 'o'}", "max_steps=2",
                                 "preview.num_prompts=1", "preview.max_new_tokens=4"])
    assert result.exit_code == 0, result.output
    assert "held-out loss per response token: before" in result.output and "2 steps" in result.output


def test_generate_and_models_list(tiny_model):
    result = runner.invoke(app, ["generate", "--model", tiny_model, "--prompt", "Where is HQ?", "--max-new-tokens", "5"])
    assert result.exit_code == 0 and "> Where is HQ?" in result.output
    result = runner.invoke(app, ["generate", "--model", tiny_model, "--prompt", "Parking?", "--sample", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0 and "smollm2-135m-instruct" in result.output


def test_data_pairs_and_reward_score_with_the_toxicity_scorer(tmp_path):
    rankings = tmp_path / "r.jsonl"
    rankings.write_text("".join(json.dumps({"id": "1", "prompt": "p", "completions": ["good", "fine", "you idiot"],
                                            "ranks": ranks, "annotator": a}) + "\n" for a, ranks in (("x", [1, 2, 3]), ("y", [2, 1, 3]))))
    pairs = tmp_path / "pairs.jsonl"
    result = runner.invoke(app, ["data", "pairs", "--rankings", str(rankings), "--output", str(pairs)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in pairs.read_text().splitlines()] == [
        {"prompt": "p", "chosen": "good", "rejected": "you idiot"}, {"prompt": "p", "chosen": "fine", "rejected": "you idiot"}]
    result = runner.invoke(app, ["data", "pairs", "--rankings", str(rankings), "--output", str(pairs)])
    assert result.exit_code != 0 and "exists" in str(result.exception)  # never overwritten

    scored = tmp_path / "scored.jsonl"
    result = runner.invoke(app, ["reward", "score", "--data", str(pairs), "--model", "toxicity", "--output", str(scored)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in scored.read_text().splitlines()]
    assert all(r["scores"]["toxicity_rejected"] > r["scores"]["toxicity_chosen"] for r in rows)
