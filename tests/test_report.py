"""`rlhfkit report`: the page's parts from a run directory, and the page rendered in a real headless chromium."""

from __future__ import annotations

import os
import re
import shutil

import matplotlib.image
import pytest
from typer.testing import CliRunner

from conftest import CHROMIUM, COMPANY_TEST, REPO, require_chromium
from rlhfkit.cli import app
from rlhfkit.config import EvalConfig
from rlhfkit.data.jsonl import read_jsonl, write_jsonl
from rlhfkit.errors import DataError, OutputExistsError
from rlhfkit.evaluation import evaluate
from rlhfkit.data.preference import load_rankings
from rlhfkit.evaluation.report import collect_stages, side_by_side, training_plots, write_report
from rlhfkit.reward.diagnostics import diagnose, write_diagnostics
from rlhfkit.online import train_ppo
from test_online import ppo_config

XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def test_training_plots_one_per_metric_group_and_rewards_against_kl():
    rows = [{"step": s, "time": 0.1 * s, "reward/score": 0.1 * s, "reward/gold": -0.05 * s, "kl/ref": 0.2 * s,
             "kl/coef": 0.05, "loss/policy": 1.0 / s, "train/early_stopped": False, "note": "text", "grad_norm": 1.0} for s in range(1, 6)]
    titles = [p.title for p in training_plots(rows)]
    assert titles == ["reward", "kl", "loss", "other", "rewards against KL"]  # no plot of the bool or the text


def test_side_by_side_keeps_file_order_and_marks_missing_answers(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [
        {"prompt": "b", "response": "b1", "model": "base", "scores": {"toxicity": 0.5}},
        {"prompt": "a", "response": "a1", "model": "base", "scores": {}},
        {"prompt": "a", "response": "a2", "model": "ppo", "scores": {"toxicity": 0.25}},
    ])
    groups, models, total = side_by_side(tmp_path / "s.jsonl", limit=5)
    assert models == ["base", "ppo"] and total == 2 and [g["prompt"] for g in groups] == ["b", "a"]
    assert groups[0]["answers"][1]["response"] is None and groups[0]["answers"][0]["scores"] == "toxicity 0.500"
    assert len(side_by_side(tmp_path / "s.jsonl", limit=1)[0]) == 1


def test_report_refuses_bad_input_and_existing_output(tmp_path):
    with pytest.raises(DataError, match="not found"):
        write_report(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nothing to report"):
        write_report(tmp_path / "empty")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss/x": 1.0}\n{"step": 2, "loss/x"\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        write_report(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss/x": 1.0}\n')
    write_report(tmp_path / "run")
    with pytest.raises(OutputExistsError):
        write_report(tmp_path / "run")
    write_report(tmp_path / "run", overwrite=True)


@pytest.fixture(scope="module")
def pipeline_dir(tiny_model, tmp_path_factory):
    """A small run directory as the pipeline leaves it: a PPO stage and an evaluation of its start and end."""
    root = tmp_path_factory.mktemp("pipeline")
    train_ppo(ppo_config(tiny_model, root / "ppo", steps=3, preview={"num_prompts": 2}))
    write_jsonl(root / "prompts.jsonl", [{"prompt": XSS}] + [r for _, r in read_jsonl(COMPANY_TEST)][:5])
    evaluate(EvalConfig(models={"start": tiny_model, "ppo": str(root / "ppo")}, prompts=str(root / "prompts.jsonl"),
                        output_dir=root / "eval", sampling={"max_new_tokens": 8}, bootstrap_samples=200))
    hand = root / "handmade"
    hand.mkdir()
    write_jsonl(hand / "samples.jsonl", [{"prompt": XSS, "response": XSS, "model": "m", "scores": {"toxicity": 0.1}}])
    rankings = load_rankings(REPO / "data" / "company_feedback" / "rankings_test.jsonl")
    (root / "reward").mkdir()
    write_diagnostics(diagnose(rankings, lambda prompts, texts: [len(t) for t in texts]), root / "reward")
    return root


def test_report_shows_the_gold_judge_beside_the_reward_model_and_the_reward_diagnostics(pipeline_dir):
    stages = {s.name: s for s in collect_stages(pipeline_dir, max_samples=3)}
    labels = [label for label, _ in stages["eval"].eval_rows]
    # the eval prompts carry the company test set's truth: the gold rows come right after the reward win rate
    assert labels[labels.index("reward win rate vs start") + 1] == "gold win rate vs start"
    assert {"similarity to ideal answer", "fact recall", "states a contradicted fact"} <= set(labels)
    assert stages["eval"].moved[0] == "ppo vs start:" and any("gold win rate" in line for line in stages["eval"].moved)
    assert "similarity to the ideal answer" in [p.title for p in stages["eval"].plots]
    assert stages["reward"].diagnostics[0] == "held-out: 35 items, 140 completions, 201 consensus pairs"


@pytest.mark.integration
def test_cli_report_renders_in_headless_chromium(pipeline_dir, tmp_path):
    sync_playwright = require_chromium().sync_playwright

    result = CliRunner().invoke(app, ["report", str(pipeline_dir)])
    assert result.exit_code == 0, result.output
    page_path = pipeline_dir / "report.html"
    html = page_path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # self-contained: nothing fetched
    assert "<script>window.__xss" not in html and "&lt;script&gt;" in html
    n_images = html.count("<img ")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        decoded = page.eval_on_selector_all("img", "imgs => imgs.filter(i => i.complete && i.naturalWidth > 100).length")
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        xss = page.evaluate("window.__xss")
        eval_cells = page.eval_on_selector_all("table.eval th", "ths => ths.map(t => t.textContent)")
        shown = page.inner_text("body")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()

    # ppo: reward, kl, policy, loss, train, value, response, time, throughput + rewards against KL; eval: 2 bar plots
    assert n_images >= 12 and decoded == n_images
    assert headings == ["ppo", "eval", "handmade", "reward"]  # in the order they ran
    assert xss is None and shown.count(XSS) >= 3  # the payload shows as text (eval prompt, hand-made prompt and answer), never runs
    assert {"start", "ppo", "toxicity mean [CI]", "KL to start (nats)", "gold win rate vs start"} <= set(eval_cells)
    assert "The gold judge prefers" in shown and "Reward-model diagnostics" in shown
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] > 900 and pixels[..., :3].std() > 0.05  # a long page, not a blank one
    if os.environ.get("RLHFKIT_KEEP_SCREENSHOTS"):
        shutil.copy(shot, os.environ["RLHFKIT_KEEP_SCREENSHOTS"])
