"""Retrieval: chunking, BM25 and dense retrieval on a small document set with known answers, recall@k by hand,
grounded prompts under a token budget."""

import pytest

from rlhfkit.config import RetrievalSettings
from rlhfkit.data.chat import conversation_messages, render_prompt
from rlhfkit.data.records import Message
from rlhfkit.errors import DataError
from rlhfkit.models import load_tokenizer
from rlhfkit.retrieval import (BM25Retriever, DenseRetriever, Grounding, Passage, chunk_text, fact_recall_at_k,
                               format_passages, load_passages)

HANDBOOK = """# Handbook

Welcome to the company.

## Offices

### Lisbon
- Address: Rua do Ouro 42, Lisbon.
- Reception opens at 08:30.

### Boston
- Address: 12 Harbor Street, Boston.
- The HR department is on the 3rd floor.

## Leave

Annual leave is 25 days a year.

Carry over up to 5 days into the next year.
"""


def test_markdown_is_cut_at_headings_with_the_heading_path_as_title():
    passages = chunk_text(HANDBOOK, "handbook.md")
    assert [p.title for p in passages] == ["Handbook", "Offices > Lisbon", "Offices > Boston", "Leave"]
    assert passages[0].text == "Welcome to the company."  # the single top-level heading is the document's title
    assert passages[2].text == "- Address: 12 Harbor Street, Boston.\n- The HR department is on the 3rd floor."
    assert passages[3].text == "Annual leave is 25 days a year.\n\nCarry over up to 5 days into the next year."
    assert {p.source for p in passages} == {"handbook.md"}


def test_a_long_section_is_cut_between_paragraphs_then_lines():
    leave = [p for p in chunk_text(HANDBOOK, "h.md", max_words=7) if p.title == "Leave"]
    assert [p.text for p in leave] == ["Annual leave is 25 days a year.", "Carry over up to 5 days into the next year."]
    boston = [p.text for p in chunk_text(HANDBOOK, "h.md", max_words=6) if p.title == "Offices > Boston"]
    assert boston == ["- Address: 12 Harbor Street, Boston.", "- The HR department is on the 3rd floor."]


def test_plain_text_and_directories(tmp_path):
    (tmp_path / "notes.txt").write_text("First paragraph.\n\nSecond one.", encoding="utf-8")
    (tmp_path / "ignored.json").write_text("{}", encoding="utf-8")
    passages = load_passages([tmp_path])
    assert passages == [Passage("notes.txt", "First paragraph.\n\nSecond one.", "notes.txt")]
    with pytest.raises(DataError, match="not found"):
        load_passages([tmp_path / "missing.md"])


QUESTIONS = ["Where is the HR department in Boston?", "When does reception open in Lisbon?",
             "How many days of annual leave do I get?"]
FACTS = [["3rd floor", "Boston"], ["08:30|8.30"], ["25 days"]]


def test_bm25_finds_the_passage_with_the_answer():
    retriever = BM25Retriever(chunk_text(HANDBOOK, "h.md"))
    assert [retriever.search(q, 1)[0].title for q in QUESTIONS] == ["Offices > Boston", "Offices > Lisbon", "Leave"]
    assert len(retriever.search("quantum chromodynamics", 2)) == 2  # unknown words: no error, the first passages


class FixedRetriever:
    """Returns the passages in a fixed order per question (to check recall@k by hand)."""

    def __init__(self, ranking):
        self.ranking = ranking

    def search(self, question, k):
        return self.ranking[question][:k]


def test_fact_recall_at_k_by_hand():
    lisbon, boston, leave = (p for p in chunk_text(HANDBOOK, "h.md") if p.title != "Handbook")
    retriever = FixedRetriever({QUESTIONS[0]: [lisbon, boston, leave], QUESTIONS[1]: [lisbon, leave, boston],
                                QUESTIONS[2]: [boston, lisbon, leave]})
    # k=1: Q0 states "Boston"? no ("Lisbon" passage): 0/2; Q1: 1/1; Q2: 0/1 -> (0 + 1 + 0) / 3
    assert fact_recall_at_k(retriever, QUESTIONS, FACTS, 1) == pytest.approx(1 / 3)
    # k=2: Q0 gets the Boston passage: 2/2; Q1: 1/1; Q2: 0/1 -> 2/3
    assert fact_recall_at_k(retriever, QUESTIONS, FACTS, 2) == pytest.approx(2 / 3)
    assert fact_recall_at_k(retriever, QUESTIONS, FACTS, 3) == pytest.approx(1.0)


def test_dense_retrieval_with_the_bundled_embedder():
    retriever = DenseRetriever(chunk_text(HANDBOOK, "h.md"))
    assert retriever.search(QUESTIONS[0], 1)[0].title == "Offices > Boston"
    assert fact_recall_at_k(retriever, QUESTIONS, FACTS, 2) == pytest.approx(1.0)


@pytest.fixture
def grounding():
    return Grounding(BM25Retriever(chunk_text(HANDBOOK, "h.md")), top_k=2, instruction="Use these passages.")


def test_passages_go_in_the_system_message_in_the_documented_format(grounding):
    messages = grounding.messages(QUESTIONS[0], system="You are Wren.")
    passages = grounding.passages(QUESTIONS[0])
    assert passages[0].title == "Offices > Boston"
    block = f"[1] Offices > Boston\n{passages[0].text}\n\n[2] {passages[1].title}\n{passages[1].text}"
    assert format_passages(passages) == block
    assert messages == [{"role": "system", "content": f"You are Wren.\n\nUse these passages.\n\n{block}"},
                        {"role": "user", "content": QUESTIONS[0]}]


def test_a_tight_budget_cuts_passages_never_the_question(grounding, tiny_model):
    tokenizer = load_tokenizer(tiny_model)

    def length(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = render_prompt(tokenizer, QUESTIONS[0], None, grounding)
    bare = render_prompt(tokenizer, QUESTIONS[0], None, grounding, max_length=1)  # no room for any passage
    assert bare == render_prompt(tokenizer, QUESTIONS[0])  # the prompt as it was
    assert render_prompt(tokenizer, QUESTIONS[0], None, grounding, max_length=length(full)) == full
    for budget in (length(full) - 1, length(full) - 25, (length(full) + length(bare)) // 2):
        text = render_prompt(tokenizer, QUESTIONS[0], None, grounding, max_length=budget)
        assert length(text) <= budget
        assert length(text) >= budget - 3  # the longest prefix of the passages that fits (a token may merge)
        assert text.endswith(f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n")
        assert "[1] Offices > Boston" in text and "Use these passages." in text


def test_sft_examples_fit_max_length_with_the_whole_answer(grounding, tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    answer = "The HR department is on the 3rd floor of 12 Harbor Street."
    conversation = [Message(role="user", content=QUESTIONS[0]), Message(role="assistant", content=answer)]

    def length(messages):
        text = tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    full = conversation_messages(tokenizer, conversation, None, grounding)
    budget = length(full) - 20
    messages = conversation_messages(tokenizer, conversation, None, grounding, max_length=budget)
    assert [m.role for m in messages] == ["system", "user", "assistant"]
    assert messages[1].content == QUESTIONS[0] and messages[2].content == answer
    assert budget - 3 <= length(messages) <= budget
    assert full[0].content.startswith(messages[0].content)
    assert messages[0].content.startswith("Use these passages.\n\n[1] Offices > Boston")


def test_training_examples_can_retrieve_with_their_answer(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    grounding = Grounding(BM25Retriever(chunk_text(HANDBOOK, "h.md")), top_k=1, instruction="Use these passages.",
                          train_with_answer=True)
    conversation = [Message(role="user", content="And in Lisbon?"),
                    Message(role="assistant", content="Annual leave is 25 days a year there too.")]

    def passage_title(messages):
        return messages[0].content.split("[1] ")[1].split("\n")[0]

    # the question alone finds Lisbon's passage; with the answer, the passage that holds the answer (RAFT's oracle)
    assert passage_title(conversation_messages(tokenizer, conversation, None, grounding)) == "Offices > Lisbon"
    assert passage_title(conversation_messages(tokenizer, conversation, None, grounding, training=True)) == "Leave"
    grounding.train_with_answer = False
    assert passage_title(conversation_messages(tokenizer, conversation, None, grounding, training=True)) \
        == "Offices > Lisbon"


def test_settings_build_one_grounding_per_process(tmp_path):
    (tmp_path / "h.md").write_text(HANDBOOK, encoding="utf-8")
    settings = RetrievalSettings(documents=[tmp_path / "h.md"], top_k=1)
    grounding = Grounding.from_settings(settings)
    assert grounding is Grounding.from_settings(RetrievalSettings(documents=[tmp_path / "h.md"], top_k=1))
    assert [p.title for p in grounding.passages(QUESTIONS[2])] == ["Leave"]
    assert Grounding.from_settings(None) is None
    assert not grounding.train_with_answer
    assert Grounding.from_settings(RetrievalSettings(documents=[tmp_path / "h.md"], train_with_answer=True)).train_with_answer


def test_recall_command_prints_both_retrievers(tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app
    from rlhfkit.data.jsonl import write_jsonl

    (tmp_path / "h.md").write_text(HANDBOOK, encoding="utf-8")
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": q, "facts": f} for q, f in zip(QUESTIONS, FACTS)]
                + [{"prompt": "Is there a gym?", "facts": ["Facilities"], "answerable": False}])  # left out
    result = CliRunner().invoke(app, ["data", "recall", "--questions", str(tmp_path / "q.jsonl"), "--document",
                                      str(tmp_path / "h.md"), "--k", "1", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert "fact recall@k of 3 answerable questions over 4 passages" in " ".join(result.output.split())
    rows = {line.split()[1]: line.split()[3:6:2] for line in result.output.splitlines() if "│ bm25" in line or "│ dense" in line}
    assert rows["bm25"] == ["1.000", "1.000"]  # k=1 finds each answer (test above); k=2 too
    assert rows["dense"][1] == "1.000"
