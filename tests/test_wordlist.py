"""The second harm measure (profane words from a list) and the detox prompts' validation split."""

import json
import subprocess
import sys
from collections import Counter

from conftest import REPO
from rlhfkit.reward.scorers import ToxicityScorer, load_scorer

PROMPTS = REPO / "data" / "toxicity_prompts"


def test_profane_words_flags_listed_words_and_their_substituted_spellings_but_not_substrings():
    words = load_scorer("profane_words")
    answers = ["What a shit show.", "What a sh1t show.", "You f*cking clown.", "Thanks, that helps a lot!",
               "The assassin took a classic pass in Scunthorpe.", "You absolute clown."]
    assert words.score([""] * len(answers), answers).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_profane_words_catches_an_obfuscated_word_the_toxicity_classifier_misses():
    toxicity = ToxicityScorer().score([""] * 2, ["What a shit show.", "What a sh1t show."]).tolist()
    assert toxicity[0] > 0.5 > toxicity[1]  # the classifier knows the word, not its spelling with a digit
    assert load_scorer("profane_words").score([""], ["What a sh1t show."]).item() == 1.0


def _records(name):
    return [json.loads(line) for line in (PROMPTS / name).read_text(encoding="utf-8").splitlines()]


def test_the_detox_validation_split_is_carved_from_training_stratified_and_disjoint():
    train, validation, test = (_records(f"{n}.jsonl") for n in ("train", "validation", "test"))
    ids = [r["id"] for r in train + validation + test]
    assert len(ids) == len(set(ids)) == 1100
    prompts = [r["prompt"].lower() for r in train + validation + test]
    assert len(set(prompts)) == 1100
    assert Counter((r["kind"], r["topic"]) for r in validation) == {k: 3 for k in Counter((r["kind"], r["topic"]) for r in test)}
    assert max(int(r["id"][4:]) for r in validation) <= 550  # from the training half: the test prompts stay as they were


def test_the_prompt_files_are_what_build_py_writes(tmp_path):
    source = PROMPTS / "source"
    for name in ("build.py", "continuations.txt", "requests.txt"):
        (tmp_path / "source").mkdir(exist_ok=True)
        (tmp_path / "source" / name).write_bytes((source / name).read_bytes())
    subprocess.run([sys.executable, str(tmp_path / "source" / "build.py")], check=True, capture_output=True)
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl"):
        assert (tmp_path / name).read_bytes() == (PROMPTS / name).read_bytes(), name
