import json
import subprocess
import sys

import pytest
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


def run_main(capsys, monkeypatch, *args) -> tuple[int, str]:
    """`rlhfkit ARGS` through the console script's own entry point, in this process: (exit status, stderr)."""
    from rlhfkit.cli import main

    monkeypatch.setattr(sys, "argv", ["rlhfkit", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main()
    return stopped.value.code, capsys.readouterr().err


def assert_one_error_line(result, *fragments):
    status, stderr = result
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert status == 2 and len(errors) == 1 and errors[0].startswith("error: "), stderr[-2000:]
    assert stderr.rstrip().endswith(errors[0]) and all(f in errors[0] for f in fragments), errors[0]


def test_bad_input_is_one_error_line_with_status_2_and_leaves_nothing(tiny_model, sft_files, tmp_path, capsys, monkeypatch):
    cli = lambda *args: run_main(capsys, monkeypatch, *args)  # noqa: E731
    train, _ = sft_files
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "café", "response": "oui"}\n'.encode("latin-1"))
    out = tmp_path / "out"
    assert_one_error_line(cli("sft", f"model={tiny_model}", f"train_file={latin1}", f"output_dir={out}"),
                          "latin1.jsonl:1: not UTF-8 text")
    assert not out.exists()
    (tmp_path / "a-file").write_text("x")
    assert_one_error_line(cli("sft", f"model={tiny_model}", f"train_file={train}", f"output_dir={tmp_path / 'a-file' / 'run'}"),
                          "cannot create output_dir", "a-file is a file")
    rankings = tmp_path / "r.jsonl"
    rankings.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 1], "annotator": "x"}) + "\n")
    untied = tmp_path / "untied.jsonl"
    untied.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "ranks": [1, 2], "annotator": "x"}) + "\n")
    assert_one_error_line(cli("data", "pairs", "--rankings", untied, "--output", tmp_path / "a-file" / "p.jsonl"),
                          "cannot write", "p.jsonl")
    assert_one_error_line(cli("reward", "train", f"model={tiny_model}", f"train_file={rankings}", f"output_dir={out}"),
                          "no comparisons: every ranking ties")
    assert not out.exists()


def test_version_and_every_command_prints_its_full_config_and_lists_its_settings(tmp_path):
    from importlib.metadata import version

    import yaml

    from rlhfkit.config import PPOConfig, load_config

    assert runner.invoke(app, ["--version"]).output.strip() == f"rlhfkit {version('rlhfkit')}"
    printed = runner.invoke(app, ["ppo", "--print-config"])
    assert printed.exit_code == 0 and "kl_coef: 0.05" in printed.output and "# beta;" in printed.output
    # the printed file, once the required settings are filled in, is a valid config with every default
    raw = yaml.safe_load(printed.output)
    raw.update(model="m", prompts_file="p.jsonl", output_dir="o", rewards=[{"scorer": "toxicity"}])
    (tmp_path / "ppo.yaml").write_text(yaml.safe_dump(raw))
    filled = load_config(PPOConfig, tmp_path / "ppo.yaml")
    assert filled == PPOConfig(model="m", prompts_file="p.jsonl", output_dir="o", rewards=[{"scorer": "toxicity"}])
    assert filled.lora.dropout == 0.0  # a block's own default (PPO's LoRA has no dropout), not the class's
    for command in (["sft"], ["reward", "train"], ["ppo"], ["rloo"], ["grpo"], ["dpo"], ["eval"], ["simulate"],
                    ["pipeline", "run"]):
        assert runner.invoke(app, [*command, "--print-config"]).exit_code == 0, command
        help_text = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).output
        assert "Settings (in the --config YAML or as key=value" in help_text, command
    help_text = runner.invoke(app, ["sft", "--help"], env={"COLUMNS": "200"}).output
    assert "lora.dropout = 0.05" in help_text and "report_to = tensorboard" in help_text


def test_a_tracker_that_cannot_start_is_one_error_line_and_leaves_nothing(tiny_model, sft_files, tmp_path, capsys,
                                                                          monkeypatch):
    """MLflow 3.13+ refuses its default file store unless MLFLOW_ALLOW_FILE_STORE=true (an MlflowException from
    accelerate's init_trackers): stand-in here, as mlflow is not a dependency, a tracker whose start raises so."""
    from accelerate import Accelerator

    class MlflowException(Exception):
        pass

    def refuse(self, *args, **kwargs):
        raise MlflowException("The file store is deprecated.\nSet MLFLOW_ALLOW_FILE_STORE=true to use it anyway.")

    monkeypatch.setattr(Accelerator, "init_trackers", refuse)
    train, _ = sft_files
    out = tmp_path / "out"
    assert_one_error_line(run_main(capsys, monkeypatch, "sft", f"model={tiny_model}", f"train_file={train}",
                                   f"output_dir={out}", "max_steps=1", "report_to=tensorboard"),
                          "report_to", "tensorboard", "MlflowException: The file store is deprecated.")
    assert not out.exists()


def test_eval_of_a_model_that_does_not_exist_leaves_no_output_directory(tiny_model, tmp_path, capsys, monkeypatch):
    from conftest import COMPANY_TEST

    out = tmp_path / "out"
    assert_one_error_line(run_main(capsys, monkeypatch, "eval", "--models", f"a={tiny_model},b={tmp_path / 'nope'}",
                                   "--prompts", COMPANY_TEST, "--output-dir", out), "nope")
    assert not out.exists()


def test_data_pairs_of_rankings_that_all_tie_is_an_error_and_writes_nothing(tmp_path, capsys, monkeypatch):
    rankings = tmp_path / "r.jsonl"
    rankings.write_text("".join(json.dumps({"prompt": f"p{i}", "completions": ["a", "b", "c"], "ranks": [1, 1, 1],
                                            "annotator": a}) + "\n" for i in range(3) for a in "xy"))
    out = tmp_path / "pairs.jsonl"
    for consensus in ("--consensus", "--no-consensus"):
        assert_one_error_line(run_main(capsys, monkeypatch, "data", "pairs", "--rankings", rankings, "--output", out,
                                       consensus), "6 rankings give no pairs", "--keep-ties")
        assert not out.exists()


def test_rloo_and_grpo_are_the_online_trainer_with_their_algorithm_fixed(tmp_path):
    """`rlhfkit grpo` prints and runs PPOConfig with algorithm grpo; a config may repeat it, and one that names another
    algorithm is refused before anything loads. `rlhfkit ppo` still takes any algorithm."""
    import yaml

    from rlhfkit.config import PPOConfig, load_config

    for algorithm in ("rloo", "grpo"):
        printed = runner.invoke(app, [algorithm, "--print-config"])
        assert printed.exit_code == 0 and f"rlhfkit {algorithm}: every setting" in printed.output
        assert yaml.safe_load(printed.output)["algorithm"] == algorithm
        ppo_printed = runner.invoke(app, ["ppo", "--print-config"]).output
        # every setting with its meaning, as `rlhfkit ppo` shows them: only the title and the algorithm differ
        assert [line for line in printed.output.splitlines() if not line.startswith(("# rlhfkit", "algorithm:"))] == \
            [line for line in ppo_printed.splitlines() if not line.startswith(("# rlhfkit", "algorithm:"))]
        help_text = runner.invoke(app, [algorithm, "--help"], env={"COLUMNS": "200"}).output
        assert f"algorithm = {algorithm}" in help_text and "kl_coef = 0.05" in help_text
    required = ["model=m", "prompts_file=p.jsonl", f"output_dir={tmp_path / 'o'}", "rewards=[{scorer: toxicity}]",
                "sampling.num_samples=4"]
    assert load_config(PPOConfig, None, required, fixed={"algorithm": "grpo"}).algorithm == "grpo"
    assert load_config(PPOConfig, None, [*required, "algorithm=grpo"], fixed={"algorithm": "grpo"}).algorithm == "grpo"
    config = tmp_path / "c.yaml"
    config.write_text("algorithm: rloo\n")
    for args in (["--config", str(config)], ["algorithm=ppo"]):
        refused = runner.invoke(app, ["grpo", *args, *required])
        assert refused.exit_code != 0 and "rlhfkit grpo runs algorithm grpo, not" in str(refused.exception)
    assert not (tmp_path / "o").exists()
    assert load_config(PPOConfig, None, [*required, "algorithm=grpo"]).algorithm == "grpo"  # what `rlhfkit ppo` reads


def test_no_vllm_server_is_one_error_line_naming_the_url_and_the_fix(tiny_model, tmp_path, capsys, monkeypatch):
    """`sampling.backend: vllm` with nothing listening at sampling.vllm_url: status 2 before any output is written."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "grpo"
    result = run_main(capsys, monkeypatch, "ppo", f"model={tiny_model}", "prompts_file=data/company/train.jsonl",
                      f"output_dir={out}", "rewards=[{scorer: toxicity}]", "algorithm=grpo", "sampling.num_samples=2",
                      "sampling.backend=vllm", f"sampling.vllm_url={url}")
    assert_one_error_line(result, url, "rlhfkit vllm-serve", "make vllm-env")
    assert not out.exists()


def test_vllm_serve_without_the_vllm_virtualenv_says_how_to_build_it(tmp_path, capsys, monkeypatch):
    result = run_main(capsys, monkeypatch, "vllm-serve", "--python", tmp_path / "missing" / "python")
    assert_one_error_line(result, str(tmp_path / "missing" / "python"), "make vllm-env")
