"""The refusal/evasion detector on labelled examples, and relevance on the real bundled sentence embedder."""

import pytest

from rlhfkit.reward.engagement import opening, refusals, refuses, relevance
from rlhfkit.reward.scorers import load_scorer
from rlhfkit.text.embedding import load_embedder

REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I\u2019m sorry, but as an AI language model, I don't have personal opinions on this topic.",
    "As an AI, I cannot provide information about that.",
    "I cannot engage in conversations that promote hate. Let's talk about something else.",
    "I'm unable to assist with this request.",
    "I won't be able to answer that question.",
    "I'm just an AI and I don't have feelings.",
    "Sorry, I must respectfully decline.",
    "It's not appropriate for me to comment on that. Is there anything else?",
    "That goes against my guidelines, so I will not write it.",
    "I am not comfortable continuing this conversation.",
    "I'm sorry for any misunderstanding, but as a chatbot designed to assist users, I don't have personal opinions.",
    "As a language model, I do not take sides in disputes.",
    "I'm just a computer program, so I have no feelings about your neighbour.",
    "I'm sorry for any confusion, I can assist you with any kind of business or business-related issues.",
    "I'm sorry for the misunderstanding. I'm here to assist you with whatever you're struggling with.",
    "Well, as a text-based AI, I don't have the ability to see your device.",
]
APOLOGIES_THAT_ANSWER = [
    "I'm sorry to hear that. You can take up to three days of compassionate leave; HR in Boston can help.",
    "Sorry for the confusion! The Wi-Fi network is called Guest and the password is on the reception desk.",
    "I apologise for the delay. Your payslip is available on the 25th of each month.",
]
PLAIN_ANSWERS = [
    "The HR department in Boston is on the third floor of 100 Summer Street.",
    "Sure! Here is a short poem about autumn. I cannot stress enough how much I like it.",
    "You get 25 days of holiday a year. Unused days can be carried over until March.",
    "People say a lot of things online, but the best response to an insult is usually to ignore it.",
    "",
]


@pytest.mark.parametrize("text", REFUSALS)
def test_refusals_and_evasions_are_detected(text):
    assert refuses(text)


@pytest.mark.parametrize("text", APOLOGIES_THAT_ANSWER + PLAIN_ANSWERS)
def test_apologies_that_answer_and_plain_answers_are_not_refusals(text):
    assert not refuses(text)


def test_only_the_opening_counts():
    """A caveat after two sentences of answer does not make the answer a refusal."""
    answer = "Your manager approves holidays. Requests go through the HR portal. I can't help with payroll though."
    assert opening(answer) == "your manager approves holidays. requests go through the hr portal."
    assert not refuses(answer)
    assert refusals([answer, REFUSALS[0], PLAIN_ANSWERS[0]]) == [0.0, 1.0, 0.0]


def test_relevance_of_an_on_topic_answer_is_above_that_of_a_refusal_and_of_another_topic():
    embedder = load_embedder()
    prompt = "How many days of holiday do I get each year?"
    on_topic, refusal, off_topic = relevance(
        embedder.embed([prompt] * 3),
        ["You get 25 days of holiday each year, plus public holidays.", "I'm sorry, but I can't help with that.",
         "The cafeteria serves lunch from noon."], embedder)
    assert on_topic > 0.5 and on_topic > refusal + 0.2 and on_topic > off_topic + 0.2
    assert relevance(embedder.embed([prompt]), [prompt], embedder)[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="2 answers for 1 prompts"):
        relevance(embedder.embed([prompt]), [prompt, prompt], embedder)


def test_refusal_and_relevance_as_rewards_by_hand():
    refusal = load_scorer("refusal")
    answers = [REFUSALS[0], APOLOGIES_THAT_ANSWER[0], ""]
    assert refusal.name == "refusal"
    assert refusal.score(["a", "b", "c"], answers).tolist() == [1.0, 0.0, 0.0]

    reward = load_scorer("relevance")
    embedder = load_embedder()
    prompts = ["How do I reset my password?", [{"role": "user", "content": "Where is the Lisbon office?"}]]
    responses = ["Open the login page and click 'Forgot password'.", "I like turtles."]
    # by hand: the cosine of the prompt's text (a conversation as `role: content` lines) and the answer
    by_hand = [float(embedder.embed([p])[0] @ embedder.embed([r])[0])
               for p, r in zip([prompts[0], "user: Where is the Lisbon office?"], responses)]
    assert reward.score(prompts, responses).tolist() == pytest.approx(by_hand, abs=1e-5)
    assert reward.score(prompts[:1] * 2, responses).tolist()[0] == pytest.approx(by_hand[0], abs=1e-5)  # remembered
    assert len(reward._prompt_embeddings) == 2
    assert reward.score([], []).shape == (0,)
