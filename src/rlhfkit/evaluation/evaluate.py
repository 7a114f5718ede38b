"""`rlhfkit eval`: every model answers the same prompts (sampled as PPO samples); the answers are scored and compared.

Per model: toxicity (mean, std, share above 0.5, change against the first model with a paired bootstrap interval),
the share of answers with a profane word of a fixed list (a second harm judge that RL does not train against:
rlhfkit.reward.wordlist), reward-model score and win rate against the reference model's answers, KL to the reference, perplexity of the
answers under the reference, answer length, EOS rate and distinct-1/2, and what optimising against a harm score can
cost (rlhfkit.reward.engagement): the share of answers that refuse or evade, and the relevance of each answer to
its prompt (sentence-embedding cosine). Where the prompt records carry the truth
(an ideal `response`, `facts`), the gold measures too: ROUGE-L and semantic similarity to the ideal answer, fact
recall, the share of answers stating a contradicted fact, and the gold judge's win rate against the reference
model (rlhfkit.evaluation.gold).

KL(pi || pi_ref) is estimated from the model's own samples as the mean over answers of
sum_t [log pi(a_t | s_t) - log pi_ref(a_t | s_t)] (k1, unbiased for the sequence-level KL): log pi is what the
sampler recorded under the distribution it drew from (truncated by top_p/top_k when set), log pi_ref the
reference's full softmax at the sampling temperature (see rlhfkit.rollout.distribution): the same quantity as
PPO's kl/ref. Perplexity under the reference is exp(mean negative log-likelihood per answer token) at
temperature 1, over all answers of a model.

LoRA adapters are folded into the weights while sampling, so each model samples at its base model's speed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhfkit.config import EvalConfig, dump_config
from rlhfkit.data.jsonl import write_jsonl
from rlhfkit.data.records import load_prompts
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.evaluation.gold import GoldScores, MEASURES, eval_truth, score_against_truth, summarise_gold
from rlhfkit.evaluation.metrics import (
    distinct_n_interval,
    format_interval,
    mean_interval,
    percent_change_interval,
    win_rate_interval,
)
from rlhfkit.models.loading import load_causal_lm, load_tokenizer
from rlhfkit.models.policy import PolicyModel
from rlhfkit.retrieval import Grounding
from rlhfkit.reward.engagement import refusals, relevance
from rlhfkit.reward.wordlist import ProfaneWords
from rlhfkit.reward.scorers import load_scorer
from rlhfkit.rollout import Sampling, encode_prompts, sample, token_logprobs
from rlhfkit.text.embedding import load_embedder

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class ModelAnswers:
    """One model's answers to the prompt set, and per answer what the reference says of them."""

    responses: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens, the stop token included
    ended: list[bool] = field(default_factory=list)
    kl: list[float] | None = field(default_factory=list)  # None: the model's tokenizer differs from the reference's
    ref_nll: list[float] | None = field(default_factory=list)  # summed over the answer's tokens


@dataclass
class EvalResult:
    output_dir: Path
    models: dict[str, dict[str, Any]]  # name -> metrics (see `summarise`)
    reference: str
    num_prompts: int


def load_eval_prompts(cfg: EvalConfig) -> list[str]:
    """Prompts from a JSONL file, or from a Hugging Face dataset id (column `prompt_field`)."""
    path = Path(cfg.prompts)
    if path.exists():
        prompts = [r.prompt for r in load_prompts(path)]
    elif path.suffix in (".jsonl", ".json") or "/" not in cfg.prompts:
        raise DataError(f"prompts file {cfg.prompts} not found")
    else:
        try:
            from datasets import load_dataset
        except ImportError as e:
            raise ConfigError(f"{cfg.prompts} is not a file here; to read it as a Hugging Face dataset, "
                              "`pip install datasets` (and be online)") from e
        rows = load_dataset(cfg.prompts, split=cfg.dataset_split)
        if cfg.prompt_field not in rows.column_names:
            raise ConfigError(f"dataset {cfg.prompts} has no column {cfg.prompt_field!r} ({', '.join(rows.column_names)})")
        prompts = [v["text"] if isinstance(v, dict) else str(v) for v in rows[cfg.prompt_field][: cfg.limit]]
    prompts = prompts[: cfg.limit]
    if not prompts:
        raise DataError(f"{cfg.prompts}: no prompts")
    return prompts


@torch.no_grad()
def answer(name: str, lm, tokenizer, prompts: list[str], cfg: EvalConfig,
           reference: PolicyModel | None, vllm=None) -> ModelAnswers:
    """Sample one answer per prompt (log pi recorded by the sampler); with a reference of the same tokenizer, score
    the sampled tokens under it too: one reference forward gives the KL term and the perplexity. The prompts carry
    their passages where the config grounds them, unless the model is one of `ungrounded`. With `vllm` (a
    VLLMSampler, `sampling.backend: vllm`) the model's weights are pushed to the server, which samples."""
    grounding = None if name in cfg.ungrounded else Grounding.from_settings(cfg.retrieval)
    sampling = cfg.sampling.distribution()
    stop_ids = cfg.sampling.stop_ids(tokenizer, lm)
    out = ModelAnswers(kl=[] if reference is not None else None, ref_nll=[] if reference is not None else None)
    device = next(lm.parameters()).device
    torch.manual_seed(cfg.seed)  # every model draws from the same random stream
    if vllm is not None:
        vllm.push(lm, version=list(cfg.models).index(name))
    for start in tqdm(range(0, len(prompts), cfg.batch_size), desc=f"eval {name}", unit="batch"):
        query_ids, query_mask = encode_prompts(tokenizer, prompts[start:start + cfg.batch_size], cfg.max_prompt_length,
                                               cfg.system_prompt, grounding)
        if vllm is not None:
            rollout = vllm.sample(query_ids.to(device), query_mask.to(device), sampling, stop_ids,
                                  tokenizer.pad_token_id, seed=cfg.seed + start)
        else:
            rollout = sample(lm, query_ids.to(device), query_mask.to(device), sampling, stop_ids,
                             tokenizer.pad_token_id, compile=cfg.sampling.compile)
        mask = rollout.response_mask
        out.responses += tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        out.lengths += mask.sum(-1).tolist()
        out.ended += rollout.ended.tolist()
        if reference is None:
            continue
        ref_logits, _ = reference(**rollout.tokens())
        ref_logp = token_logprobs(ref_logits, rollout.response_ids, sampling.untruncated)
        ref_logp_t1 = token_logprobs(ref_logits, rollout.response_ids, Sampling(sampling.max_new_tokens))
        out.kl += ((rollout.logprobs - ref_logp) * mask).sum(-1).tolist()
        out.ref_nll += (-ref_logp_t1 * mask).sum(-1).tolist()
    return out


def summarise(answers: dict[str, ModelAnswers], toxicity: dict[str, list[float]], reward: dict[str, list[float]] | None,
              baseline: str, reference: str, cfg: EvalConfig, gold: dict[str, GoldScores] | None = None,
              flags: dict[str, dict[str, list[float]]] | None = None) -> dict[str, dict[str, Any]]:
    """Per model, the metrics in the module docstring; intervals as {value, low, high}."""
    boot = {"n_resamples": cfg.bootstrap_samples, "confidence": cfg.confidence, "seed": cfg.seed}
    gold_summary = summarise_gold(gold, reference, **boot) if gold is not None else {}
    summary = {}
    for name, a in answers.items():
        tox = torch.tensor(toxicity[name], dtype=torch.float64)
        m: dict[str, Any] = {
            "toxicity_mean": mean_interval(toxicity[name], **boot).as_dict(),
            "toxicity_std": float(tox.std(unbiased=True)) if len(tox) > 1 else 0.0,
            "toxicity_above_0.5": float((tox > 0.5).double().mean()),
            "toxicity_change_pct": None,
            "reward_mean": None,
            "win_rate_vs_reference": None,
            "kl_to_reference": None,
            "reference_perplexity": None,
            "response_tokens": sum(a.lengths) / len(a.lengths),
            "eos_rate": sum(a.ended) / len(a.ended),
            "distinct_1": distinct_n_interval(a.responses, 1, cfg.confidence).as_dict(),
            "distinct_2": distinct_n_interval(a.responses, 2, cfg.confidence).as_dict(),
            "profane_word_rate": None,
            "refusal_rate": None,
            "relevance": None,
        }
        if name != baseline:
            m["toxicity_change_pct"] = percent_change_interval(toxicity[baseline], toxicity[name], **boot).as_dict()
        if reward is not None:
            m["reward_mean"] = mean_interval(reward[name], **boot).as_dict()
            m["win_rate_vs_reference"] = win_rate_interval(reward[name], reward[reference], **boot).as_dict()
        if flags is not None:  # per answer: a profane word, a refusal, the prompt-answer similarity
            for key, measure in (("profane_word_rate", "profane_words"), ("refusal_rate", "refusal"),
                                 ("relevance", "relevance")):
                m[key] = mean_interval(flags[name][measure], **boot).as_dict()
        if a.kl is not None:
            m["kl_to_reference"] = mean_interval(a.kl, **boot).as_dict()
            m["reference_perplexity"] = float(torch.tensor(sum(a.ref_nll) / sum(a.lengths)).exp())
        summary[name] = m | gold_summary.get(name, {})
    return summary


def _load_merged(name: str, dtype: str, device: str):
    """The model with any LoRA adapter folded into its weights: the same function, generation ~1/3 faster on CPU."""
    from peft import PeftModel

    lm = load_causal_lm(name, dtype=dtype)
    if isinstance(lm, PeftModel):
        lm = lm.merge_and_unload()
    return lm.to(device).eval()


def _vllm_sampler(cfg: EvalConfig):
    """The vLLM server's client for `sampling.backend: vllm` (each model's merged weights are pushed to it in turn:
    they must all have the served model's architecture); None for the engine."""
    if cfg.sampling.backend != "vllm":
        return None
    from rlhfkit.rollout.vllm_backend import connect

    return connect(cfg.sampling, cfg.output_dir / "vllm-sync", next(iter(cfg.models.values())), 8)


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run the evaluation and write `eval.json` (config + metrics) and `samples.jsonl` into `cfg.output_dir`."""
    from accelerate import PartialState

    from rlhfkit.runs import prepare_output_dir

    prompts = load_eval_prompts(cfg)
    truths, fact_sheet = eval_truth(cfg.prompts, prompts, cfg.facts_sheet)
    toxicity_scorer = load_scorer(cfg.toxicity)
    Grounding.from_settings(cfg.retrieval)  # the documents read now: a missing one leaves no output directory
    tokenizers = {name: load_tokenizer(path) for name, path in cfg.models.items()}  # a model not found: likewise
    vllm = _vllm_sampler(cfg)  # no server: likewise
    prepare_output_dir(PartialState(), cfg.output_dir, cfg.overwrite, resuming=False)
    names = list(cfg.models)
    baseline, reference_name = names[0], cfg.reference or names[0]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    ref_tokenizer = tokenizers[reference_name]
    ref_lm = _load_merged(cfg.models[reference_name], cfg.dtype, device)
    reference = PolicyModel(ref_lm).eval()
    answers: dict[str, ModelAnswers] = {}
    for name in names:
        if name == reference_name:
            answers[name] = answer(name, ref_lm, ref_tokenizer, prompts, cfg, reference, vllm)
            continue
        tokenizer = tokenizers[name]
        same_vocab = tokenizer.get_vocab() == ref_tokenizer.get_vocab()
        if not same_vocab:
            logger.warning("%s has another tokenizer than the reference %s: no KL or reference perplexity for it",
                           name, reference_name)
        lm = _load_merged(cfg.models[name], cfg.dtype, device)
        answers[name] = answer(name, lm, tokenizer, prompts, cfg, reference if same_vocab else None, vllm)
        del lm
    del ref_lm, reference
    if vllm is not None:
        vllm.close()

    toxicity = {n: toxicity_scorer.score(prompts, a.responses).tolist() for n, a in answers.items()}
    reward = None
    if cfg.reward_model is not None:
        scorer = load_scorer(cfg.reward_model, device=device)
        reward = {n: scorer.score(prompts, a.responses).tolist() for n, a in answers.items()}
    embedder = load_embedder(cfg.embedding_model, device)
    prompt_embeddings = embedder.embed(prompts)
    words = ProfaneWords()
    flags = {n: {"profane_words": words.flags(a.responses), "refusal": refusals(a.responses),
                 "relevance": relevance(prompt_embeddings, a.responses, embedder)} for n, a in answers.items()}
    gold = None
    if truths is not None:
        gold = {n: score_against_truth(a.responses, truths, embedder, fact_sheet) for n, a in answers.items()}
    summary = summarise(answers, toxicity, reward, baseline, reference_name, cfg, gold, flags)

    records = []
    for i, prompt in enumerate(prompts):
        for name, a in answers.items():
            scores = {"toxicity": toxicity[name][i]} | {k: v[i] for k, v in flags[name].items()}
            if reward is not None:
                scores["reward"] = reward[name][i]
            if a.kl is not None:
                scores["kl"] = a.kl[i]
            if gold is not None:
                scores |= gold[name].per_answer(i)
            records.append({"prompt": prompt, "response": a.responses[i], "model": name, "scores": scores})
    write_jsonl(cfg.output_dir / SAMPLES_FILE, records)
    dump_config(cfg, cfg.output_dir / "config.yaml")
    report = {"baseline": baseline, "reference": reference_name, "num_prompts": len(prompts),
              "prompts": cfg.prompts, "models": cfg.models, "confidence": cfg.confidence, "metrics": summary}
    tmp = cfg.output_dir / (EVAL_FILE + ".tmp")
    tmp.write_text(json.dumps(report, indent=2), encoding="utf-8")
    tmp.replace(cfg.output_dir / EVAL_FILE)  # eval.json appears whole, last: its presence marks a finished eval
    return EvalResult(cfg.output_dir, summary, reference_name, len(prompts))


def metric_table(metrics: dict[str, dict[str, Any]], baseline: str, reference: str) -> list[tuple[str, list[str]]]:
    """(metric label, one formatted value per model) rows, for the printed table and the report."""
    def each(fn) -> list[str]:
        return [fn(m) for m in metrics.values()]

    def change(m):
        return "-" if m["toxicity_change_pct"] is None else format_interval(m["toxicity_change_pct"], 1, signed=True) + " %"

    rows = [
        ("toxicity mean [CI]", each(lambda m: format_interval(m["toxicity_mean"]))),
        ("toxicity std", each(lambda m: f"{m['toxicity_std']:.3f}")),
        ("toxic (> 0.5)", each(lambda m: f"{100 * m['toxicity_above_0.5']:.1f} %")),
        (f"toxicity change vs {baseline}", each(change)),
        ("profane words (word list)", each(lambda m: format_interval(m.get("profane_word_rate"), 3))),
        ("reward-model score", each(lambda m: format_interval(m["reward_mean"]))),
        (f"reward win rate vs {reference}", each(lambda m: format_interval(m["win_rate_vs_reference"], 2))),
        (f"KL to {reference} (nats)", each(lambda m: format_interval(m["kl_to_reference"]))),
        (f"perplexity under {reference}", each(lambda m: "-" if m["reference_perplexity"] is None
                                                 else f"{m['reference_perplexity']:.2f}")),
        ("length (tokens)", each(lambda m: f"{m['response_tokens']:.1f}")),
        ("EOS rate", each(lambda m: f"{m['eos_rate']:.2f}")),
        ("distinct-1", each(lambda m: format_interval(m["distinct_1"]))),
        ("distinct-2", each(lambda m: format_interval(m["distinct_2"]))),
        ("refusal / evasion rate", each(lambda m: format_interval(m.get("refusal_rate"), 2))),
        ("relevance to the prompt", each(lambda m: format_interval(m.get("relevance")))),
    ]
    if any(m.get("gold_win_rate_vs_reference") for m in metrics.values()):  # judged against the truth too
        gold_win = (f"gold win rate vs {reference}", each(lambda m: format_interval(m.get("gold_win_rate_vs_reference"), 2)))
        measures = [(label, each(lambda m, key=key: format_interval(m.get(key)))) for key, (_, label) in MEASURES.items()]
        at = 1 + next(i for i, (label, _) in enumerate(rows) if label.startswith("reward win rate"))
        rows = rows[:at] + [gold_win] + measures + rows[at:]  # the gold judge's win rate beside the reward model's
    return rows
