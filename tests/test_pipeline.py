"""`rlhfkit pipeline run`: the stages wired on the tiny model, skipping finished stages, resuming an interrupted one,
refusing silently changed settings; and the shipped config's --quick profile on the bundled model."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import COMPANY_TEST, COMPANY_TRAIN, REPO
from rlhfkit.cli import app
from rlhfkit.data.jsonl import read_jsonl
from rlhfkit.config import load_config
from rlhfkit.errors import ConfigError
from rlhfkit.pipeline import DONE_FILE, PipelineConfig, run_pipeline, stage_configs

RANKINGS = REPO / "data" / "company_feedback" / "rankings_train.jsonl"
RANKINGS_TEST = REPO / "data" / "company_feedback" / "rankings_test.jsonl"


def tiny_pipeline(model: str, out, **changes) -> PipelineConfig:
    raw = {
        "model": model,
        "output_dir": str(out),
        "sft": {"train_file": str(COMPANY_TRAIN), "max_steps": 2, "batch_size": 4, "preview": {"num_prompts": 0},
                "mixed_precision": "no"},
        "reward": {"train_file": str(RANKINGS), "max_steps": 2, "batch_size": 2},
        "ppo": {"model": "{sft}", "prompts_file": str(COMPANY_TRAIN),
                "rewards": [{"scorer": "{reward}"}, {"scorer": "toxicity", "weight": -1.0}],
                "steps": 4, "save_every": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
                "sampling": {"max_new_tokens": 6}, "preview": {"num_prompts": 0}},
        "eval": {"models": {"base": "{base}", "sft": "{sft}", "ppo": "{ppo}"}, "reference": "sft",
                 "prompts": str(COMPANY_TEST), "limit": 4, "reward_model": "{reward}",
                 "sampling": {"max_new_tokens": 6}, "bootstrap_samples": 200},
    }
    for key, value in changes.items():
        stage, _, leaf = key.partition("__")
        raw[stage][leaf] = value
    return PipelineConfig.model_validate(raw)


def test_pipeline_runs_every_stage_then_skips_them(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = run_pipeline(tiny_pipeline(tiny_model, out))
    assert [(s.name, s.status) for s in first.stages] == [("sft", "ran"), ("reward", "ran"), ("ppo", "ran"), ("eval", "ran")]
    assert (out / "sft" / "adapter_config.json").is_file() and (out / "ppo" / "adapter_config.json").is_file()
    ppo_cfg = yaml.safe_load((out / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["model"] == str(out / "sft") and ppo_cfg["rewards"][0]["scorer"] == str(out / "reward")
    assert list(first.evaluation["metrics"]) == ["base", "sft", "ppo"] and first.evaluation["reference"] == "sft"
    html = first.report.read_text()
    assert all(f">{stage}</h2>" in html for stage in ("sft", "reward", "ppo", "eval"))

    import rlhfkit.sft

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(rlhfkit.sft, "train_sft", must_not_run)
    again = run_pipeline(tiny_pipeline(tiny_model, out))
    assert [s.status for s in again.stages] == ["skipped"] * 4
    assert [s.seconds for s in again.stages] == [pytest.approx(s.seconds, abs=0.1) for s in first.stages]


def test_an_interrupted_stage_resumes_and_changed_settings_need_a_restart(tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = tiny_pipeline(tiny_model, out)
    import rlhfkit.losses as losses

    real, calls = losses.clipped_policy_loss, {"n": 0}

    def dies_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # two minibatches per step: the fifth call is in step 3, after checkpoint-2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(losses, "clipped_policy_loss", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg)
    monkeypatch.setattr(losses, "clipped_policy_loss", real)
    assert (out / "sft" / DONE_FILE).is_file() and not (out / "ppo" / DONE_FILE).exists()
    assert (out / "ppo" / "checkpoint-2").is_dir()

    resumed = run_pipeline(cfg)
    assert [(s.name, s.status) for s in resumed.stages] == [
        ("sft", "skipped"), ("reward", "skipped"), ("ppo", "resumed"), ("eval", "ran")]
    steps = [json.loads(line)["step"] for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    changed = tiny_pipeline(tiny_model, out, ppo__kl_coef=0.2)
    with pytest.raises(ConfigError, match=r"stage ppo finished .* \(changed: kl_coef\).*--restart-from ppo"):
        run_pipeline(changed)
    restarted = run_pipeline(changed, restart_from="ppo")
    assert [s.status for s in restarted.stages] == ["skipped", "skipped", "ran", "ran"]
    assert yaml.safe_load((out / "ppo" / "config.yaml").read_text())["kl_coef"] == 0.2


def test_a_setting_added_since_a_stage_finished_counts_as_unchanged_at_its_default(tiny_model, tmp_path):
    """A stage finished by an older rlhfkit has no entry for a setting added since: at its default it is what the
    stage ran with (skipped); set to anything else it is a change (refused, named)."""
    out = tmp_path / "run"
    only_sft = tiny_pipeline(tiny_model, out).model_copy(update={"reward": None, "ppo": None, "eval": None})
    run_pipeline(only_sft)
    marker = out / "sft" / DONE_FILE
    done = json.loads(marker.read_text())
    assert done["config"].pop("gradient_accumulation_steps") == 1
    marker.write_text(json.dumps(done))
    assert [s.status for s in run_pipeline(only_sft).stages] == ["skipped"]
    accumulating = tiny_pipeline(tiny_model, out, sft__gradient_accumulation_steps=2).model_copy(
        update={"reward": None, "ppo": None, "eval": None})
    with pytest.raises(ConfigError, match=r"\(changed: gradient_accumulation_steps\)"):
        run_pipeline(accumulating)


def test_pipeline_settings_errors(tiny_model, tmp_path):
    no_sft = tiny_pipeline(tiny_model, tmp_path).model_copy(update={"sft": None})
    with pytest.raises(ConfigError, match=r"ppo: \{sft\} names no stage of this pipeline"):
        stage_configs(no_sft)
    with pytest.raises(ConfigError, match="output_dir is set by the pipeline"):
        stage_configs(tiny_pipeline(tiny_model, tmp_path, sft__output_dir="elsewhere"))
    with pytest.raises(ConfigError, match=r"stage eval: invalid settings\n  limit"):
        stage_configs(tiny_pipeline(tiny_model, tmp_path, eval__limit=-1))
    with pytest.raises(ConfigError, match="no such stage"):
        run_pipeline(tiny_pipeline(tiny_model, tmp_path), restart_from="rl")


@pytest.mark.integration
@pytest.mark.slow
def test_the_classic_ppo_recipe_quick_profile_on_the_bundled_model(tmp_path):
    """configs/company_ppo.yaml --quick on the bundled model: SFT, a reward model on people's rankings, PPO with a
    critic from it, the summary and the report."""
    cfg = load_config(PipelineConfig, REPO / "configs" / "company_ppo.yaml")
    assert cfg.quick and stage_configs(cfg)["ppo"].model.endswith("sft")
    result = CliRunner().invoke(app, ["pipeline", "run", str(REPO / "configs" / "company_ppo.yaml"), "--quick",
                                      f"output_dir={tmp_path / 'demo'}"])
    assert result.exit_code == 0, result.output
    for stage in ("sft", "reward", "ppo", "eval"):
        assert (tmp_path / "demo" / stage / DONE_FILE).is_file()
    assert "toxicity mean" in result.output and "report:" in result.output
    assert (tmp_path / "demo" / "report.html").stat().st_size > 50_000
    # judged against the truth too: the gold rows and what moved; PPO logged the gold reward (weight 0)
    # (the table wraps its labels at the runner's width: the per-model summary below it is read instead)
    assert "ppo vs sft:" in result.output
    assert "gold win rate" in result.output.split("ppo vs sft:")[1].split("report:")[0]
    assert all("reward/gold_similarity" in row for _, row in read_jsonl(tmp_path / "demo" / "ppo" / "metrics.jsonl")
               if "reward/score" in row)


def test_rloo_and_grpo_stages_run_the_online_trainer_with_their_algorithm(tiny_model, tmp_path):
    """The compare recipe's shape on the tiny model: online stages named after their algorithm, side by side in eval."""
    online = {"model": "{sft}", "prompts_file": str(COMPANY_TRAIN), "rewards": [{"scorer": "toxicity", "weight": -1.0}],
              "steps": 1, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "preview": {"num_prompts": 0},
              "sampling": {"max_new_tokens": 4, "num_samples": 2}}
    cfg = tiny_pipeline(tiny_model, tmp_path / "run").model_copy(update={
        "reward": None, "ppo": None, "rloo": online, "grpo": online,
        "eval": {"models": {"sft": "{sft}", "rloo": "{rloo}", "grpo": "{grpo}"}, "prompts": str(COMPANY_TEST),
                 "limit": 3, "sampling": {"max_new_tokens": 4}, "bootstrap_samples": 100}})
    configs = stage_configs(cfg)
    assert list(configs) == ["sft", "rloo", "grpo", "eval"]
    assert (configs["rloo"].algorithm, configs["grpo"].algorithm) == ("rloo", "grpo")
    result = run_pipeline(cfg)
    assert list(result.evaluation["metrics"]) == ["sft", "rloo", "grpo"]
    assert yaml.safe_load((tmp_path / "run" / "grpo" / "config.yaml").read_text())["loss_aggregation"] == "sequence_mean"
    with pytest.raises(ConfigError, match="the rloo stage runs algorithm rloo, not grpo"):
        stage_configs(cfg.model_copy(update={"rloo": {**online, "algorithm": "grpo"}}))


def test_the_dpo_stage_trains_from_sft_on_the_rankings_and_is_evaluated_beside_it(tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = tiny_pipeline(tiny_model, out).model_copy(update={
        "reward": None, "ppo": None,
        "dpo": {"model": "{sft}", "train_file": str(RANKINGS), "eval_file": str(RANKINGS_TEST), "max_steps": 2,
                "batch_size": 2, "max_length": 128},
        "eval": {"models": {"sft": "{sft}", "dpo": "{dpo}"}, "prompts": str(COMPANY_TEST), "limit": 3,
                 "sampling": {"max_new_tokens": 4}, "bootstrap_samples": 100}})
    configs = stage_configs(cfg)
    assert list(configs) == ["sft", "dpo", "eval"] and configs["dpo"].model == str(out / "sft")
    assert stage_configs(cfg.model_copy(update={"dpo": {"train_file": str(RANKINGS)}}))["dpo"].model == tiny_model
    result = run_pipeline(cfg)
    assert [(s.name, s.status) for s in result.stages] == [("sft", "ran"), ("dpo", "ran"), ("eval", "ran")]
    assert list(result.evaluation["metrics"]) == ["sft", "dpo"]
    rows = list(read_jsonl(out / "dpo" / "metrics.jsonl"))
    assert [row["step"] for _, row in rows if "eval/rewards/accuracies" in row] == [0, 2]
    # the DPO adapter's base is the merged SFT model inside its own run directory: plain peft loads it alone
    base = out / "dpo" / "base"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "dpo")
    assert "dpo" in result.report.read_text()


def test_the_compare_recipe_parses_with_equal_budgets():
    configs = stage_configs(load_config(PipelineConfig, REPO / "configs" / "compare.yaml"))
    online = [configs[name] for name in ("ppo", "rloo", "grpo")]
    assert [c.algorithm for c in online] == ["ppo", "rloo", "grpo"]
    assert len({(c.steps, c.batch_size, c.ppo_epochs, c.mini_batch_size, c.learning_rate) for c in online}) == 1
    assert configs["eval"].reference == "sft" and set(configs["eval"].models) >= {"base", "sft", "ppo", "rloo", "grpo", "dpo"}
    assert configs["dpo"].model == configs["ppo"].model and configs["dpo"].train_file == configs["reward"].train_file


def test_one_retrieval_block_grounds_every_stage_but_sft_ungrounded(tiny_model, tmp_path, monkeypatch):
    """The pipeline's `retrieval:` reaches SFT, reward training, PPO's rollouts and eval, each with its own token
    budget; sft_ungrounded and the models eval lists as ungrounded see the bare questions."""
    from rlhfkit.retrieval import Grounding

    budgets = []  # the token budget of every grounded rendering, which tells the stage that rendered it
    fit = Grounding.fit
    monkeypatch.setattr(Grounding, "fit", lambda self, tok, prompt, system=None, max_tokens=None, render=None,
                        query=None: budgets.append(max_tokens) or fit(self, tok, prompt, system, max_tokens, render, query))
    cfg = tiny_pipeline(tiny_model, tmp_path / "run", sft__max_length=256, reward__max_length=300,
                        ppo__max_prompt_length=128, ppo__steps=1, ppo__save_every=1, eval__max_prompt_length=200,
                        eval__limit=3, eval__reward_model=None)
    cfg = cfg.model_copy(update={
        "retrieval": {"documents": [str(REPO / "data" / "company" / "FACTS.md")], "top_k": 2},
        "sft_ungrounded": cfg.sft,
        "eval": {**cfg.eval, "models": {"plain": "{sft_ungrounded}", "sft": "{sft}"}, "ungrounded": ["plain"],
                 "reference": "plain"}})
    configs = stage_configs(cfg)
    assert list(configs) == ["sft_ungrounded", "sft", "reward", "ppo", "eval"]
    assert configs["sft_ungrounded"].retrieval is None
    assert all(configs[s].retrieval.top_k == 2 for s in ("sft", "reward", "ppo", "eval"))
    result = run_pipeline(cfg)
    assert list(result.evaluation["metrics"]) == ["plain", "sft"]
    train, test = len(list(read_jsonl(COMPANY_TRAIN))), 3
    assert budgets.count(256) == train  # every SFT example once (sft_ungrounded: none)
    assert budgets.count(300) >= 2 * 2 * 4  # reward training: 2 steps of 2 prompts with 4 completions each
    assert budgets.count(128) >= 4  # PPO: one rollout of 4 prompts
    assert budgets.count(200) == test  # eval: only the grounded model's prompts
    reward_config = json.loads((tmp_path / "run" / "reward" / "config.json").read_text())
    assert reward_config["rlhfkit_reward"]["retrieval"]["top_k"] == 2  # the reward model grounds wherever it scores
    with pytest.raises(ConfigError, match="dpo: the pipeline's retrieval block cannot ground"):
        stage_configs(cfg.model_copy(update={"dpo": {"train_file": str(COMPANY_TRAIN)}}))


@pytest.mark.integration
@pytest.mark.slow
def test_grounded_recipe_quick_profile_on_the_bundled_model(tmp_path):
    """configs/company_grounded.yaml --quick: both SFT stages, GRPO, then eval with and without passages."""
    result = CliRunner().invoke(app, ["pipeline", "run", str(REPO / "configs" / "company_grounded.yaml"), "--quick",
                                      f"output_dir={tmp_path / 'grounded'}"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "grounded" / "eval" / "eval.json").read_text())
    assert list(evaluation["metrics"]) == ["sft_ungrounded", "base_grounded", "sft", "grpo"]
    assert all("fact_recall" in m for m in evaluation["metrics"].values())


@pytest.mark.integration
@pytest.mark.slow
def test_detox_recipe_quick_profile_on_the_bundled_model(tmp_path):
    """configs/detox.yaml --quick: PPO against toxicity and refusals, then eval reports what it cost."""
    result = CliRunner().invoke(app, ["pipeline", "run", str(REPO / "configs" / "detox.yaml"), "--quick",
                                      f"output_dir={tmp_path / 'detox'}"])
    assert result.exit_code == 0, result.output
    logged = [json.loads(line) for line in (tmp_path / "detox" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(f"reward/{term}" in logged[-1] for term in ("toxicity", "refusal")), sorted(logged[-1])
    evaluation = json.loads((tmp_path / "detox" / "eval" / "eval.json").read_text())
    assert list(evaluation["metrics"]) == ["base", "detox"]
    for m in evaluation["metrics"].values():
        for measure in ("toxicity_mean", "refusal_rate", "relevance", "distinct_2"):
            assert m[measure]["low"] <= m[measure]["value"] <= m[measure]["high"], (measure, m[measure])


def test_the_feedback_stage_ranks_the_sft_policys_own_answers_for_the_reward_model(tiny_model, tmp_path, monkeypatch):
    """sft -> feedback (K answers per prompt from the SFT model, ranked by simulated annotators who check the facts)
    -> reward trained on those rankings beside people's; the reward model's diagnostics count the simulated ones."""
    out = tmp_path / "run"
    cfg = tiny_pipeline(tiny_model, out)
    cfg = cfg.model_copy(update={
        "feedback": {"model": "{sft}", "prompts_file": str(COMPANY_TEST), "limit": 3, "k": 3, "max_new_tokens": 6,
                     "gold": [{"scorer": f"truth:{REPO / 'data' / 'company'}"},
                              {"scorer": f"rouge_l:{REPO / 'data' / 'company'}", "weight": 0.1}],
                     "annotators": 2, "noise": 0.05},
        "reward": {**cfg.reward, "train_file": ["{feedback}/rankings.jsonl", str(RANKINGS)]},
        "ppo": None, "eval": None})
    with pytest.raises(ConfigError, match="feedback: output_file is set by the pipeline"):
        stage_configs(cfg.model_copy(update={"feedback": {**cfg.feedback, "output_file": "x.jsonl"}}))
    result = run_pipeline(cfg)
    assert [s.name for s in result.stages] == ["sft", "feedback", "reward"]
    rankings = [r for _, r in read_jsonl(out / "feedback" / "rankings.jsonl")]
    items = [r for _, r in read_jsonl(out / "feedback" / "completions.jsonl")]
    assert rankings and all(r["simulated"] and r["annotator"] in ("sim-1", "sim-2") for r in rankings)
    assert {r["prompt"] for r in rankings} == {i["prompt"] for i in items} and len(rankings) == 2 * len(items)
    diagnostics = json.loads((out / "reward" / "diagnostics.json").read_text())
    people = len(list(read_jsonl(RANKINGS)))
    assert diagnostics["train_rankings"] == people + len(rankings)
    assert diagnostics["train_rankings_simulated"] == len(rankings)
    again = run_pipeline(cfg)
    assert [s.status for s in again.stages] == ["skipped"] * 3


def test_the_demo_trains_on_training_questions_and_only_its_evaluation_reads_the_test_set():
    """configs/company_assistant.yaml (make demo): every training stage reads training or validation questions; the
    73 test questions are read by the final evaluation alone, and the documented override moves it to validation."""
    cfg = load_config(PipelineConfig, REPO / "configs" / "company_assistant.yaml")
    configs = stage_configs(cfg)
    assert list(configs) == ["sft", "feedback", "reward", "grpo", "eval"]
    training = {k: c.model_dump(mode="json") for k, c in configs.items() if k != "eval"}
    assert "company/test.jsonl" not in json.dumps(training)
    assert configs["eval"].prompts == "data/company/test.jsonl"
    choosing = stage_configs(load_config(PipelineConfig, REPO / "configs" / "company_assistant.yaml",
                                         ["eval.prompts=data/company/validation.jsonl"]))
    assert choosing["eval"].prompts == "data/company/validation.jsonl"
    assert configs["reward"].fact_swap_file.name == "validation.jsonl"
    assert [t.scorer for t in configs["grpo"].rewards][0] == "truth:data/company/train.jsonl"


@pytest.mark.integration
@pytest.mark.slow
def test_make_demo_quick_profile_on_the_bundled_model(tmp_path):
    """configs/company_assistant.yaml --quick (make demo's loop): grounded SFT, its own answers ranked by simulated
    annotators, a reward model on those, GRPO against the truth reward, evaluation with the truth measures."""
    out = tmp_path / "truth"
    result = CliRunner().invoke(app, ["pipeline", "run", str(REPO / "configs" / "company_assistant.yaml"), "--quick",
                                      f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    rankings = [r for _, r in read_jsonl(out / "feedback" / "rankings.jsonl")]
    assert rankings and all(r["simulated"] for r in rankings)
    diagnostics = json.loads((out / "reward" / "diagnostics.json").read_text())
    assert diagnostics["train_rankings_simulated"] == len(rankings) and diagnostics["fact_swap_pairs"] > 0
    logged = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert "reward/truth" in logged[-1]
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert list(evaluation["metrics"]) == ["sft", "grpo"]
    assert all("fact_recall" in m and "declined_answerable" in m for m in evaluation["metrics"].values())
    assert evaluation["metrics"]["grpo"]["win_rate_vs_reference"] is not None  # judged by the reward model too
    assert "grpo vs sft:" in result.output and (out / "report.html").is_file()
