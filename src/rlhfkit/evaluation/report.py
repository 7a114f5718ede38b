"""`rlhfkit report RUN_DIR`: one self-contained HTML page (plots inlined as PNG) of what a run directory holds.

A run directory is one stage's output or a pipeline's directory of stages. Every directory under it with
  - metrics.jsonl gives training curves, one plot per metric group (reward/, kl/, policy/, loss/, ...), and, for
    PPO, each reward against the KL to the reference (a reward that rises while a gold score falls is gamed);
  - eval.json gives the evaluation table and toxicity / reward with their confidence intervals, and where the
    prompts carried the truth, the gold measures, the reward model's and the gold judge's win rates side by side,
    and what moved against the reference model;
  - diagnostics.json (a reward model's) gives its held-out diagnostics;
  - samples.jsonl gives side-by-side answers (prompt, one column per model, scores under each answer).
"""

from __future__ import annotations

import base64
import io
import json
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402

from rlhfkit.data.chat import prompt_text  # noqa: E402
from rlhfkit.data.jsonl import read_jsonl  # noqa: E402
from rlhfkit.errors import DataError, OutputExistsError  # noqa: E402
from rlhfkit.evaluation.evaluate import EVAL_FILE, SAMPLES_FILE, metric_table  # noqa: E402
from rlhfkit.evaluation.gold import what_moved  # noqa: E402
from rlhfkit.reward.diagnostics import DIAGNOSTICS_FILE, RewardDiagnostics  # noqa: E402

REPORT_FILE = "report.html"
# Metric groups in the order a reader looks for them; groups not named here follow, alphabetically.
GROUP_ORDER = ["reward", "kl", "policy", "loss", "train", "eval", "value", "response", "time", "throughput"]
SKIP_KEYS = {"step", "time"}


@dataclass
class Plot:
    title: str
    png_base64: str


@dataclass
class Stage:
    name: str
    path: Path
    plots: list[Plot] = field(default_factory=list)
    config: str | None = None
    evaluation: dict[str, Any] | None = None
    eval_rows: list[tuple[str, list[str]]] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # what moved against the reference model (gold.what_moved)
    diagnostics: list[str] = field(default_factory=list)  # a reward model's held-out diagnostics
    samples: list[dict[str, Any]] = field(default_factory=list)  # {"prompt", "answers": [{model, response, scores}]}
    sample_models: list[str] = field(default_factory=list)
    total_samples: int = 0


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def training_plots(rows: list[dict[str, Any]]) -> list[Plot]:
    """One line plot per metric group against the step, and each reward against kl/ref when both exist."""
    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for row in rows:
        for key, value in row.items():
            if key in SKIP_KEYS or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            group = key.split("/", 1)[0] if "/" in key else "other"
            xs, ys = series[group].setdefault(key, ([], []))
            xs.append(row["step"])
            ys.append(value)
    order = sorted(series, key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else len(GROUP_ORDER), g))
    plots = []
    for group in order:  # one figure per group, one small panel per metric: their scales differ
        keys = sorted(series[group])
        cols = min(len(keys), 3)
        rows_n = -(-len(keys) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(2.9 * cols, 2.1 * rows_n), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            xs, ys = series[group][key]
            ax.plot(xs, ys, marker="." if len(xs) < 30 else None, color="#4c78a8")
            ax.set_title(key, fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys):]:
            ax.axis("off")
        fig.suptitle(group, fontsize=11)
        fig.tight_layout()
        plots.append(Plot(group, _png(fig)))
    kl = series.get("kl", {}).get("kl/ref")
    # the score and its terms (reward/<scorer>), not its normalised, KL-penalised or spread forms
    rewards = {k: v for k, v in series.get("reward", {}).items()
               if k not in ("reward/score_std", "reward/normalized", "reward/with_kl")}
    if kl and rewards:
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        kl_at = dict(zip(*kl))
        for key, (xs, ys) in sorted(rewards.items()):
            points = [(kl_at[x], y) for x, y in zip(xs, ys) if x in kl_at]
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, label=key)
        ax.set_xlabel("KL to the reference (nats)")
        ax.set_title("rewards against KL")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        plots.append(Plot("rewards against KL", _png(fig)))
    return plots


def _bars(ax, names: list[str], intervals: list[dict[str, float]], offset: float = 0.0, width: float = 0.8, **style):
    """Bars at the values with the intervals as error bars."""
    mid = [v["value"] for v in intervals]
    err = [[m - v["low"] for m, v in zip(mid, intervals)], [v["high"] - m for m, v in zip(mid, intervals)]]
    ax.bar([i + offset for i in range(len(names))], mid, width, yerr=err, capsize=4, **style)
    ax.set_xticks(range(len(names)), names)


def evaluation_section(report: dict[str, Any]) -> tuple[list[tuple[str, list[str]]], list[Plot]]:
    """Table rows (metric, value per model) and bar plots with confidence intervals of eval.json's metrics."""
    metrics, ci = report["metrics"], f"{round(100 * report['confidence'])}% CI"
    rows = metric_table(metrics, report["baseline"], report["reference"])
    plots = []
    for key, title in (("toxicity_mean", "mean toxicity"), ("reward_mean", "mean reward-model score"),
                       ("kl_to_reference", "KL to the reference"), ("similarity", "similarity to the ideal answer"),
                       ("fact_recall", "fact recall")):
        values = {n: m[key] for n, m in metrics.items() if m.get(key)}
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        _bars(ax, list(values), list(values.values()), color="#4c78a8")
        ax.set_title(f"{title} ({ci})")
        ax.grid(axis="y", alpha=0.3)
        plots.append(Plot(title, _png(fig)))
    judged = [n for n, m in metrics.items() if m.get("win_rate_vs_reference") and m.get("gold_win_rate_vs_reference")]
    if judged:  # the reward model's verdict beside the truth's
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        for offset, key, label, color in ((-0.2, "win_rate_vs_reference", "reward model", "#4c78a8"),
                                          (0.2, "gold_win_rate_vs_reference", "gold judge", "#f58518")):
            _bars(ax, judged, [metrics[n][key] for n in judged], offset, 0.4, color=color, label=label)
        ax.axhline(0.5, color="#666", lw=1, ls="--")
        ax.set_ylim(0, 1)
        ax.set_title(f"win rate vs {report['reference']} ({ci})")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        plots.append(Plot("win rates", _png(fig)))
    return rows, plots


def side_by_side(path: Path, limit: int) -> tuple[list[dict[str, Any]], list[str], int]:
    """The first `limit` prompts of samples.jsonl (file order, not picked), with each model's answer."""
    by_prompt: dict[str, list[dict]] = {}
    models: list[str] = []
    for lineno, r in read_jsonl(path):
        if not {"prompt", "response", "model"} <= r.keys():
            raise DataError(f"{path}:{lineno}: a sample needs prompt, response and model")
        by_prompt.setdefault(prompt_text(r["prompt"]), []).append(r)  # a prompt may be a conversation
        if r["model"] not in models:
            models.append(r["model"])
    groups = []
    for prompt, records in list(by_prompt.items())[:limit]:
        answer_of = {r["model"]: r for r in records}
        groups.append({"prompt": prompt, "answers": [
            {"model": m, "response": answer_of[m]["response"] if m in answer_of else None,
             "scores": ", ".join(f"{k} {v:.3f}" for k, v in (answer_of.get(m, {}).get("scores") or {}).items())}
            for m in models]})
    return groups, models, len(by_prompt)


def collect_stages(run_dir: Path, max_samples: int) -> list[Stage]:
    found = {p.parent for pattern in ("metrics.jsonl", EVAL_FILE, SAMPLES_FILE, DIAGNOSTICS_FILE)
             for p in run_dir.rglob(pattern) if "checkpoint-" not in str(p.parent)}
    # in the order the stages ran: each writes its config.yaml first
    stage_dirs = sorted(found, key=lambda d: ((d / "config.yaml").stat().st_mtime if (d / "config.yaml").exists()
                                              else d.stat().st_mtime, str(d)))
    stages = []
    for d in stage_dirs:
        stage = Stage(name=str(d.relative_to(run_dir)) if d != run_dir else run_dir.name, path=d)
        if (d / "config.yaml").is_file():
            stage.config = (d / "config.yaml").read_text(encoding="utf-8")
        if (d / "metrics.jsonl").is_file():
            stage.plots += training_plots([row for _, row in read_jsonl(d / "metrics.jsonl")])
        if (d / EVAL_FILE).is_file():
            stage.evaluation = json.loads((d / EVAL_FILE).read_text(encoding="utf-8"))
            stage.eval_rows, plots = evaluation_section(stage.evaluation)
            stage.moved = what_moved(stage.evaluation["metrics"], stage.evaluation["reference"])
            stage.plots += plots
        if (d / DIAGNOSTICS_FILE).is_file():
            stage.diagnostics = RewardDiagnostics(**json.loads((d / DIAGNOSTICS_FILE).read_text(encoding="utf-8"))).lines()
        if (d / SAMPLES_FILE).is_file():
            stage.samples, stage.sample_models, stage.total_samples = side_by_side(d / SAMPLES_FILE, max_samples)
        stages.append(stage)
    return stages


def write_report(run_dir: str | Path, output: str | Path | None = None, overwrite: bool = False,
                 max_samples: int = 20) -> Path:
    """Render the report of `run_dir` into `output` (default RUN_DIR/report.html); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} not found")
    output = Path(output) if output else run_dir / REPORT_FILE
    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} exists; pass --overwrite to replace it")
    stages = collect_stages(run_dir, max_samples)
    if not stages:
        raise DataError(f"{run_dir} holds no metrics.jsonl, {EVAL_FILE} or {SAMPLES_FILE}: nothing to report")
    env = Environment(loader=PackageLoader("rlhfkit.evaluation", "templates"), autoescape=select_autoescape(["html", "j2"]))
    html = env.get_template("report.html.j2").render(
        title=f"rlhfkit report: {run_dir.resolve().name}", run_dir=str(run_dir), stages=stages,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(output)
    return output
