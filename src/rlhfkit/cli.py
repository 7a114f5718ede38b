"""The `rlhfkit` command: one sub-command per stage. Thin: parse, load the config, call the library, print."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from rlhfkit.errors import RlhfkitError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Reinforcement Learning from Human Feedback, end to end.")
models_app = typer.Typer(no_args_is_help=True, help="The models rlhfkit knows by name.")
app.add_typer(models_app, name="models")
console = Console()

Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value settings over the config (e.g. epochs=1 lora.r=8)", show_default=False)]


@app.command()
def sft(
    config: Annotated[Path, typer.Option("--config", "-c", help="YAML config, e.g. configs/sft.yaml")],
    overrides: Overrides = None,
) -> None:
    """Supervised fine-tuning on prompt/response or chat JSONL (LoRA or full)."""
    from rlhfkit.config import SFTConfig, load_config
    from rlhfkit.sft import train_sft

    from accelerate import PartialState

    cfg = load_config(SFTConfig, config, overrides or [])
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
    console.print(f"{result.steps} steps; model saved in {result.output_dir}")


@app.command()
def generate(
    model: Annotated[str, typer.Option(help="alias, local directory (full model or adapter) or hub id")] = "smollm2-135m-instruct",
    prompt: Annotated[list[str], typer.Option(help="a user message; repeat for several")] = ...,
    max_new_tokens: int = 128,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    temperature: float = 0.7,
    top_p: float = 0.9,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    seed: int = 0,
) -> None:
    """A quick look at a model's answers."""
    from transformers import set_seed

    from rlhfkit.generation import generate_responses
    from rlhfkit.models import load_causal_lm, load_tokenizer

    set_seed(seed)
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model)
    answers = generate_responses(lm, tokenizer, prompt, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature, top_p=top_p, system_prompt=system)
    for p, a in zip(prompt, answers):
        console.print(f"[bold]> {p}[/bold]")
        console.print(a, markup=False, highlight=False)


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


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except RlhfkitError as e:
        Console(stderr=True).print(f"[bold red]error:[/bold red] {e}", markup=True, highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
