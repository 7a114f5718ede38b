"""The `rlhfkit` command: one sub-command per stage. Thin: parse, load the config, call the library, print."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from rlhfkit import config as configs
from rlhfkit.errors import RlhfkitError
from rlhfkit.feedback.cli import feedback_app
from rlhfkit.pipeline import RUN_SETTINGS, STAGES, PipelineConfig

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Reinforcement Learning from Human Feedback, end to end.")
models_app = typer.Typer(no_args_is_help=True, help="The models rlhfkit knows by name.")
app.add_typer(models_app, name="models")
reward_app = typer.Typer(no_args_is_help=True, help="Reward models: train on human preferences, score responses.")
app.add_typer(reward_app, name="reward")
data_app = typer.Typer(no_args_is_help=True, help="Data conversions.")
app.add_typer(data_app, name="data")
pipeline_app = typer.Typer(no_args_is_help=True, help="The whole RLHF loop from one config.")
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(feedback_app, name="feedback")
console = Console()

Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value settings over the config (e.g. epochs=1 lora.r=8)", show_default=False)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of settings (see --print-config); key=value overrides go over it")]


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"rlhfkit {version('rlhfkit')}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_show_version, help="print the version and exit")] = False,
) -> None:
    """Reinforcement Learning from Human Feedback, end to end."""


def _config_help(cls: type[BaseModel], **kwargs) -> str:
    """A command's epilog: its settings with their defaults."""
    return ("Settings (in the --config YAML or as key=value; --print-config shows them as a commented YAML "
            "file):\n\n" + escape(configs.settings_help(cls, **kwargs)))


def _print_config(cls: type[BaseModel], command: str, **kwargs):
    """An eager --print-config option: print the full default config of `cls` and exit, before anything else."""
    def show(value: bool) -> None:
        if value:
            title = f"rlhfkit {command}: every setting. Save it, fill in the required ones, and give it to rlhfkit {command}"
            typer.echo(configs.config_template(cls, title, **kwargs), nl=False)
            raise typer.Exit()

    return typer.Option("--print-config", is_eager=True, callback=show,
                        help="print every setting with its default and meaning (YAML) and exit")


@app.command(epilog=_config_help(configs.SFTConfig))
def sft(
    config: ConfigFile = None,
    overrides: Overrides = None,
    print_config: Annotated[bool, _print_config(configs.SFTConfig, "sft")] = False,
) -> None:
    """Supervised fine-tuning on prompt/response or chat data (LoRA or full), e.g. -c configs/sft.yaml."""
    from accelerate import PartialState

    from rlhfkit.sft import train_sft

    cfg = configs.load_config(configs.SFTConfig, config, overrides or [])
    result = train_sft(cfg)
    if not PartialState().is_main_process:  # under torchrun / accelerate launch, one process reports
        return
    if result.previews:
        table = Table(title="Held-out prompts, before and after SFT", show_lines=True)
        for column in ("prompt", "before", "after", "reference"):
            table.add_column(column, overflow="fold")
        for p in result.previews:
            table.add_row(p["prompt"], p["before"], p["after"], p["reference"])
        console.print(table)
    if result.eval_loss_before is not None:
        console.print(
            f"held-out loss per response token: before {result.eval_loss_before:.4f} -> after "
            f"{result.eval_loss_after:.4f}"
        )
    if result.preview_metrics:
        before, after = result.preview_metrics["before"], result.preview_metrics["after"]
        console.print(
            f"the {len(result.previews)} preview answers against the reference answers: ROUGE-L "
            f"{before['rouge_l']:.3f} -> {after['rouge_l']:.3f}, semantic similarity {before['similarity']:.3f} -> "
            f"{after['similarity']:.3f}"
        )
    console.print(f"{result.steps} steps; model saved in {result.output_dir}")


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="alias, local directory (full model or adapter) or hub id")] = "smollm2-135m-instruct",
    prompt: Annotated[list[str], typer.Option(help="a user message; repeat for several")] = ...,
    max_new_tokens: int = 128,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: Annotated[int, typer.Option(help="sample among the k most likely tokens (0: all)")] = 0,
    num_samples: Annotated[int, typer.Option(help="answers per prompt (with --sample)")] = 1,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    seed: int = 0,
) -> None:
    """A quick look at a model's answers."""
    from transformers import set_seed

    from rlhfkit.models import load_causal_lm, load_tokenizer
    from rlhfkit.rollout import generate_responses

    set_seed(seed)
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model)
    answers = generate_responses(lm, tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature, top_p=top_p, top_k=top_k, num_samples=num_samples,
                                 system_prompt=system)
    for i, p in enumerate(prompt):
        console.print(f"[bold]> {p}[/bold]")
        for a in answers[i * num_samples:(i + 1) * num_samples]:
            console.print(a, markup=False, highlight=False)


ONLINE_COMMANDS = {  # name: help (the first paragraph is the command's line in `rlhfkit --help`)
    "ppo": "PPO against rewards (reward models, classifiers) with a KL penalty against the starting model, e.g. "
           "-c configs/ppo.yaml.\n\nThe online trainer with its default algorithm, ppo; algorithm=rloo or "
           "algorithm=grpo runs the others, as `rlhfkit rloo` and `rlhfkit grpo` do.",
    "rloo": "RLOO against rewards, KL to the starting model in the reward (Ahmadian et al. 2024).\n\nThe online "
            "trainer of `rlhfkit ppo` with algorithm rloo fixed: a config may repeat it, not change it. Needs "
            "sampling.num_samples of 2 or more.",
    "grpo": "GRPO against rewards, KL to the starting model as a loss term (Shao et al. 2024), e.g. -c "
            "configs/ppo.yaml sampling.num_samples=4 critic=none.\n\nThe online trainer of `rlhfkit ppo` with "
            "algorithm grpo fixed: a config may repeat it, not change it. Needs sampling.num_samples of 2 or more.",
}


def _online_command(algorithm: str) -> None:
    """Register `rlhfkit ALGORITHM`: the online trainer (rlhfkit.online), its config `PPOConfig`; rloo and grpo fix
    their algorithm, ppo only defaults to its own (`rlhfkit ppo algorithm=grpo` runs GRPO, as before)."""
    preset = {} if algorithm == "ppo" else {"algorithm": algorithm}

    def command(config: ConfigFile = None, overrides: Overrides = None, print_config: bool = False) -> None:
        cfg = configs.load_config(configs.PPOConfig, config, overrides or [], fixed=preset, runner=f"rlhfkit {algorithm}")
        _train_online(cfg)

    # an object, not a string annotation (this module's annotations are strings, read where `algorithm` is unknown)
    command.__annotations__["print_config"] = Annotated[bool, _print_config(configs.PPOConfig, algorithm, defaults=preset)]
    app.command(algorithm, help=ONLINE_COMMANDS[algorithm], epilog=_config_help(configs.PPOConfig, defaults=preset))(command)


def _train_online(cfg: configs.PPOConfig) -> None:
    """Train, then print the held-out previews before and after, and the reward's course."""
    from accelerate import PartialState

    from rlhfkit.online import train_ppo

    result = train_ppo(cfg)
    if not PartialState().is_main_process:
        return
    if result.previews:
        table = Table(title=f"Held-out prompts, before and after {cfg.algorithm.upper()} (greedy)", show_lines=True)
        for column in ("prompt", "before", "after"):
            table.add_column(column, overflow="fold")
        for p in result.previews:
            table.add_row(Text(p["prompt"]), _answer(p["before"], p["scores_before"]), _answer(p["after"], p["scores_after"]))
        console.print(table)
    if result.history:
        first, last = result.history[0], result.history[-1]
        console.print(
            f"reward {first['reward/score']:.3f} (step {first['step']}) -> {last['reward/score']:.3f} (step {last['step']}); "
            f"KL to the reference {last['kl/ref']:.3f}; {last['throughput/episodes_per_s']:.2f} episodes/s"
        )
    console.print(f"{result.steps} steps; policy saved in {result.output_dir}")


for _algorithm in ONLINE_COMMANDS:
    _online_command(_algorithm)


@app.command(epilog=_config_help(configs.DPOConfig))
def dpo(
    config: ConfigFile = None,
    overrides: Overrides = None,
    print_config: Annotated[bool, _print_config(configs.DPOConfig, "dpo")] = False,
) -> None:
    """DPO (or IPO) straight from preference pairs or rankings, against the starting model as the reference, e.g.
    -c configs/dpo.yaml."""
    from accelerate import PartialState

    from rlhfkit.dpo import train_dpo

    cfg = configs.load_config(configs.DPOConfig, config, overrides or [])
    result = train_dpo(cfg)
    if not PartialState().is_main_process:
        return
    if result.eval_after:
        before, after = result.eval_before, result.eval_after
        console.print(
            f"held-out pairs: implicit-reward accuracy {before['rewards/accuracies']:.3f} -> "
            f"{after['rewards/accuracies']:.3f}, margin {before['rewards/margins']:.3f} -> {after['rewards/margins']:.3f}, "
            f"loss {before['loss']:.4f} -> {after['loss']:.4f}; log-probs chosen {after['logps/chosen']:.2f}, "
            f"rejected {after['logps/rejected']:.2f} (from {before['logps/chosen']:.2f}, {before['logps/rejected']:.2f}); "
            f"calibration error {after['calibration_error']:.3f}"
        )
    console.print(f"{result.steps} steps; policy saved in {result.output_dir}")


def _parse_models(specs: list[str]) -> dict[str, str]:
    """`base=smollm2-135m-instruct,sft=runs/sft` (or repeated options) -> {name: model}; a bare path is named
    after its last component."""
    models: dict[str, str] = {}
    for part in (p.strip() for spec in specs for p in spec.split(",")):
        if not part:
            continue
        name, sep, model = part.partition("=")
        if not sep:
            name, model = Path(part).name or part, part
        if name in models:
            raise typer.BadParameter(f"two models are named {name!r}; name them: NAME=MODEL", param_hint="--models")
        models[name] = model
    return models


@app.command("eval", epilog=_config_help(configs.EvalConfig))
def eval_(
    models: Annotated[Optional[list[str]], typer.Option("--models", "-m", help="NAME=MODEL,... in order; the first is the baseline (e.g. base=smollm2-135m-instruct,sft=runs/demo/sft,ppo=runs/demo/ppo)")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="prompts JSONL, or a Hugging Face dataset id (with `datasets`, online)")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="where eval.json and samples.jsonl go")] = None,
    reward_model: Annotated[Optional[str], typer.Option(help="reward-model directory: mean score and win rate")] = None,
    reference: Annotated[Optional[str], typer.Option(help="model name for KL, perplexity and win rate (default: the first)")] = None,
    limit: Annotated[Optional[int], typer.Option(help="only the first N prompts")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    config: ConfigFile = None,
    overrides: Overrides = None,
    print_config: Annotated[bool, _print_config(configs.EvalConfig, "eval")] = False,
) -> None:
    """Sample every model's answers to the same prompts; toxicity, reward, KL, perplexity, diversity, with CIs."""
    from rlhfkit.evaluation.evaluate import evaluate

    flags = {"models": _parse_models(models) if models else None, "prompts": prompts, "output_dir": output_dir,
             "reward_model": reward_model, "reference": reference, "limit": limit, "overwrite": overwrite or None}
    cfg = configs.load_config(configs.EvalConfig, config, overrides or [],
                              settings={k: v for k, v in flags.items() if v is not None})
    result = evaluate(cfg)
    _print_eval(result.models, result.reference, f"{result.num_prompts} prompts, answers sampled at temperature "
                f"{cfg.sampling.temperature}; {round(100 * cfg.confidence)}% bootstrap intervals")
    console.print(f"results in {result.output_dir / 'eval.json'}; answers in {result.output_dir / 'samples.jsonl'}")


def _print_eval(metrics: dict, reference: str, title: str) -> None:
    from rlhfkit.evaluation.evaluate import metric_table
    from rlhfkit.evaluation.gold import what_moved

    table = Table(title=title)
    table.add_column("metric")
    for name in metrics:
        table.add_column(name)
    for label, values in metric_table(metrics, next(iter(metrics)), reference):
        table.add_row(label, *values)
    console.print(table)
    for line in what_moved(metrics, reference):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


PIPELINE_STAGES = {"nested": STAGES, "omit": RUN_SETTINGS}  # a pipeline's stage blocks hold their commands' settings


@pipeline_app.command("run", epilog=_config_help(PipelineConfig, **PIPELINE_STAGES))
def pipeline_run(
    config: Annotated[Path, typer.Argument(help="pipeline YAML, e.g. configs/company_assistant.yaml")],
    overrides: Overrides = None,
    quick: Annotated[bool, typer.Option(help="the config's `quick:` profile: small sizes, a smoke run in minutes")] = False,
    restart_from: Annotated[Optional[str], typer.Option(help="run this stage and every later one again")] = None,
    print_config: Annotated[bool, _print_config(PipelineConfig, "pipeline run", **PIPELINE_STAGES)] = False,
) -> None:
    """SFT -> reward model -> PPO -> evaluation -> report, each stage in its own directory; finished stages are
    skipped on a rerun and an interrupted one resumes."""
    from rlhfkit.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(config, overrides or [], quick=quick)
    result = run_pipeline(cfg, restart_from=restart_from)
    stages = Table(title=f"pipeline {config} -> {result.output_dir}")
    for column in ("stage", "status", "minutes", "output"):
        stages.add_column(column)
    for s in result.stages:
        stages.add_row(s.name, s.status, f"{s.seconds / 60:.1f}", str(s.output_dir))
    console.print(stages)
    if result.evaluation:
        ev = result.evaluation
        _print_eval(ev["metrics"], ev["reference"], f"evaluation on {ev['num_prompts']} held-out prompts "
                    f"({round(100 * ev['confidence'])}% bootstrap intervals)")
    console.print(f"report: {result.report}")


@app.command(epilog=_config_help(configs.SimulateConfig))
def simulate(
    config: ConfigFile = None,
    overrides: Overrides = None,
    print_config: Annotated[bool, _print_config(configs.SimulateConfig, "simulate")] = False,
) -> None:
    """Simulated annotators: rank K completions by a gold utility plus noise, in the rankings format (e.g.
    -c configs/simulate.yaml)."""
    from rlhfkit.evaluation.simulate import simulate as run_simulation

    cfg = configs.load_config(configs.SimulateConfig, config, overrides or [])
    records, noise = run_simulation(cfg)
    items = len({r["id"] for r in records})
    from rlhfkit.data.preference import load_rankings
    from rlhfkit.feedback.agreement import pairwise_agreement

    agreement = pairwise_agreement(load_rankings(cfg.output_file))
    console.print(f"{len(records)} simulated rankings ({items} items x {cfg.annotators} annotators) in "
                  f"{cfg.output_file}; noise {noise:.4g}, pairwise agreement {agreement or 0:.3f}"
                  + (f"; completions for the feedback app in {cfg.items_file}" if cfg.items_file else ""))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a stage's run directory, or a pipeline's directory of stages")],
    output: Annotated[Optional[Path], typer.Option(help="the HTML file (default RUN_DIR/report.html)")] = None,
    samples: Annotated[int, typer.Option(help="prompts shown side by side per stage")] = 20,
    overwrite: Annotated[bool, typer.Option(help="replace an existing report")] = False,
) -> None:
    """One self-contained HTML page: training curves, evaluation tables with intervals, side-by-side answers."""
    from rlhfkit.evaluation.report import write_report

    path = write_report(run_dir, output, overwrite=overwrite, max_samples=samples)
    console.print(f"report written to {path}")


def _answer(text: str, scores: dict[str, float]) -> Text:
    """Model text as plain text (never rich markup), its scores dimmed below it."""
    return Text(text) + Text("\n" + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()), style="dim")


@reward_app.command("train", epilog=_config_help(configs.RewardConfig))
def reward_train(
    config: ConfigFile = None,
    overrides: Overrides = None,
    print_config: Annotated[bool, _print_config(configs.RewardConfig, "reward train")] = False,
) -> None:
    """Train a reward model on rankings or pairs (Bradley-Terry), normalise it and save it (e.g.
    -c configs/reward.yaml)."""
    from accelerate import PartialState

    from rlhfkit.reward.train import train_reward_model

    cfg = configs.load_config(configs.RewardConfig, config, overrides or [])
    result = train_reward_model(cfg)
    if not PartialState().is_main_process:
        return
    if "accuracy" in result:
        console.print(
            f"held-out pairwise accuracy {result['accuracy']:.3f} (before training {result['before_accuracy']:.3f}) "
            f"on {int(result['pairs'])} pairs; mean margin {result['mean_margin']:.3f}; "
            f"calibration error {result['calibration_error']:.3f}"
        )
    _print_diagnostics(cfg.output_dir)
    console.print(f"reward model saved in {cfg.output_dir}")


def _print_diagnostics(run_dir: Path) -> None:
    """The diagnostics a reward-model run wrote (held-out rankings only)."""
    from rlhfkit.reward.diagnostics import DIAGNOSTICS_FILE, RewardDiagnostics

    path = run_dir / DIAGNOSTICS_FILE
    if path.is_file():
        import json

        console.print("[bold]reward-model diagnostics[/bold]")
        for line in RewardDiagnostics(**json.loads(path.read_text(encoding="utf-8"))).lines():
            console.print("  " + line, markup=False, highlight=False, soft_wrap=True)


@reward_app.command("score")
def reward_score(
    data: Annotated[Path, typer.Option(help="JSONL (or a saved dataset) with prompt and response (samples), prompt/chosen/rejected (pairs), or prompt/completions/ranks (rankings: also diagnostics)")],
    model: Annotated[list[str], typer.Option(help="a reward-model directory, 'toxicity', hf:MODEL:LABEL[:logit|prob], or a gold measure (similarity:PATH, rouge_l:PATH, facts:PATH); repeat for several")],
    output: Annotated[Optional[Path], typer.Option(help="write the scored records here (JSONL); default: print a summary only")] = None,
    batch_size: int = 16,
) -> None:
    """Score responses with reward models and classifiers; adds each score to the records' "scores". On rankings
    (prompt, completions, ranks, annotator), also the diagnostics: accuracy, best-of-K, Kendall's tau with each
    annotator, length bias, and the annotators' own agreement."""
    from rlhfkit.data.jsonl import write_jsonl
    from rlhfkit.data.sources import read_records
    from rlhfkit.errors import DataError, OutputExistsError
    from rlhfkit.reward.scorers import load_scorer

    if output is not None and output.exists():
        raise OutputExistsError(f"{output} exists; choose another --output or remove it first")
    records = []
    for where, r in read_records(data):
        if "prompt" in r and "completions" in r:
            return _score_rankings(data, model, output)
        if "prompt" not in r or not ({"response"} <= r.keys() or {"chosen", "rejected"} <= r.keys()):
            raise DataError(f"{where}: needs 'prompt' and 'response' (or 'chosen' and 'rejected', or "
                            "'completions' and 'ranks')")
        records.append(r)
    scorers = [load_scorer(m) for m in model]
    table = Table(title=f"Scores of {data}")
    for column in ("scorer", "field", "mean", "std", "min", "max"):
        table.add_column(column)
    fields = ["response"] if "response" in records[0] else ["chosen", "rejected"]
    for scorer in scorers:
        for fld in fields:
            values = scorer.score([r["prompt"] for r in records], [r[fld] for r in records])
            key = scorer.name if fld == "response" else f"{scorer.name}_{fld}"
            for r, v in zip(records, values.tolist()):
                r.setdefault("scores", {})[key] = v
            table.add_row(scorer.name, fld, f"{values.mean():.4f}", f"{values.std():.4f}", f"{values.min():.4f}", f"{values.max():.4f}")
    console.print(table)
    if output is not None:
        write_jsonl(output, records)
        console.print(f"{len(records)} scored records written to {output}")


def _score_rankings(data: Path, models: list[str], output: Path | None) -> None:
    """`reward score` on rankings: each completion's score under each scorer, and each scorer's diagnostics."""
    from rlhfkit.data.jsonl import write_jsonl
    from rlhfkit.data.preference import load_rankings
    from rlhfkit.reward.diagnostics import diagnose
    from rlhfkit.reward.scorers import load_scorer

    records = load_rankings(data)
    keys = list(dict.fromkeys((r.prompt, c) for r in records for c in r.completions))
    scored = [r.model_dump(exclude_none=True) | {"scores": {}} for r in records]
    for spec in models:
        scorer = load_scorer(spec)
        value = dict(zip(keys, scorer.score([p for p, _ in keys], [c for _, c in keys]).tolist()))
        diagnostics = diagnose(records, lambda prompts, texts: [value[k] for k in zip(prompts, texts)])
        console.print(f"[bold]{scorer.name}[/bold] on {data}")
        for line in diagnostics.lines():
            console.print("  " + line, markup=False, highlight=False, soft_wrap=True)
        for r, out in zip(records, scored):
            out["scores"][scorer.name] = [value[r.prompt, c] for c in r.completions]
    if output is not None:
        write_jsonl(output, scored)
        console.print(f"{len(scored)} rankings with their completions' scores written to {output}")


@data_app.command("pairs")
def data_pairs(
    rankings: Annotated[Path, typer.Option(help="rankings JSONL (one record per annotator and prompt)")],
    output: Annotated[Path, typer.Option(help="pairs JSONL to write")],
    consensus: Annotated[bool, typer.Option(help="one pair per compared couple, by annotator majority, instead of every annotator's pairs")] = True,
    keep_ties: Annotated[bool, typer.Option(help="keep tied couples as pairs marked tie: true")] = False,
) -> None:
    """Rankings -> pairwise comparisons: every K-choose-2 pair of each ranking."""
    from rlhfkit.data.jsonl import write_jsonl
    from rlhfkit.data.preference import consolidate_rankings, load_rankings, ranking_to_pairs
    from rlhfkit.errors import DataError, OutputExistsError

    if output.exists():
        raise OutputExistsError(f"{output} exists; choose another --output or remove it first")
    records = load_rankings(rankings)
    if consensus:
        pairs = [p for item in consolidate_rankings(records, keep_ties) for p in item.to_pair_records()]
    else:
        pairs = [p for r in records for p in ranking_to_pairs(r, keep_ties)]
    if not pairs:
        raise DataError(f"{rankings}: {len(records)} rankings give no pairs: every compared couple ties"
                        + ("" if keep_ties else " (--keep-ties writes ties as pairs marked tie: true)"))
    write_jsonl(output, [p.model_dump(exclude_defaults=True) for p in pairs])
    console.print(f"{len(records)} rankings -> {len(pairs)} pairs in {output}")


@data_app.command("recall")
def data_recall(
    questions: Annotated[Path, typer.Option(help="JSONL of questions with their `facts` (e.g. data/company/test.jsonl)")],
    document: Annotated[list[Path], typer.Option(help="a document (Markdown/text) or directory of them; repeat for several")],
    k: Annotated[list[int], typer.Option(help="passages retrieved; repeat for several")] = [1, 2, 3, 5],  # noqa: B006
    max_passage_words: Annotated[int, typer.Option(help="a section is cut between paragraphs beyond this")] = 120,
) -> None:
    """Retrieval recall@k: the share of each answerable question's facts stated in its top-k passages (BM25, dense)."""
    from rlhfkit.data.records import load_truth_records
    from rlhfkit.retrieval import BM25Retriever, DenseRetriever, fact_recall_at_k, load_passages

    passages = load_passages(document, max_passage_words)
    truths = [t for t in load_truth_records(questions) if t.answerable and t.facts]
    asked, facts = [t.prompt for t in truths], [t.facts for t in truths]
    table = Table(title=f"fact recall@k of {len(truths)} answerable questions over {len(passages)} passages")
    for column in ["retriever", *(f"k={n}" for n in k), f"all ({len(passages)})"]:
        table.add_column(column)
    for name, retriever in (("bm25", BM25Retriever(passages)), ("dense", DenseRetriever(passages))):
        values = [fact_recall_at_k(retriever, asked, facts, n) for n in [*k, len(passages)]]
        table.add_row(name, *(f"{v:.3f}" for v in values))
    console.print(table)


@models_app.command("list")
def models_list() -> None:
    """Bundled model aliases, where they come from, and whether they are converted and cached."""
    from rlhfkit.models.registry import BUNDLED_MODELS, cache_dir, converted_path, find_gguf

    table = Table(title=f"Bundled models (cache: {cache_dir()})")
    table.add_column("alias", no_wrap=True)
    for column in ("description", "source", "cached"):
        table.add_column(column, overflow="fold")
    for m in BUNDLED_MODELS.values():
        try:
            source = str(find_gguf(m))
        except RlhfkitError:
            source = f"not installed: {m.install_hint}"
        cached = converted_path(m)
        table.add_row(m.alias, m.description, source, str(cached) if (cached / "config.json").is_file() else "no (converted on first use)")
    console.print(table)
    console.print("Any local HF-format directory or Hugging Face hub id works wherever a model is named.")


@app.command("vllm-serve")
def vllm_serve(
    model: Annotated[str, typer.Option("--model", "-m", help="the trainer's base model: alias or directory")] =
        "smollm2-135m-instruct",
    port: Annotated[int, typer.Option(help="the trainer's sampling.vllm_url names it")] = 8000,
    host: str = "127.0.0.1",
    dtype: Annotated[str, typer.Option(help="float32 (exact log-probs on CPU), bfloat16, ...")] = "float32",
    max_lora_rank: Annotated[int, typer.Option(help="at least the trainer's lora.r")] = 16,
    kv_cache_gib: Annotated[float, typer.Option(help="memory for vLLM's KV cache")] = 1.0,
    max_model_len: Annotated[int, typer.Option(help="prompt + response tokens at most")] = 2048,
    python: Annotated[Path, typer.Option(help="the vLLM virtualenv's interpreter (`make vllm-env` builds it)")] =
        Path(".venv-vllm/bin/python"),
) -> None:
    """The vLLM sampling server for `sampling.backend: vllm`, run by the interpreter of vLLM's own virtualenv."""
    from rlhfkit.models.registry import resolve_model

    if not python.is_file():
        raise RlhfkitError(f"no vLLM interpreter at {python}: run `make vllm-env` in the repository (it builds "
                           ".venv-vllm), or pass --python PATH to a Python with vllm installed")
    script = Path(__file__).with_name("vllm_serve.py")
    args = [str(python), str(script), "--model", resolve_model(model), "--host", host, "--port", str(port),
            "--dtype", dtype, "--max-lora-rank", str(max_lora_rank), "--kv-cache-gib", str(kv_cache_gib),
            "--max-model-len", str(max_model_len)]
    os.execv(args[0], args)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except RlhfkitError as e:
        # soft_wrap: the message stays one line however narrow the terminal (a config error lists its problems below)
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/bold red] {escape(str(e))}", markup=True,
                                                   highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
