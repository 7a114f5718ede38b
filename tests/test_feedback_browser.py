"""End to end in a real browser (Debian's chromium driven by Playwright): an admin sets up a project from files,
adds two annotators to it and marks a control item; they rank by drag-and-drop and by keyboard alone (with a
tie), rate with one key per rating, submit with Ctrl+Enter, and cannot submit a ranking they never touched; one of
them works on a 390 px wide screen; the admin sees agreement and control accuracy, the export holds the expected
consensus pairs (with or without the annotator who failed the control item) and trains a reward model.
Screenshots go to pytest's tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CHROMIUM, require_chromium
from feedback_helpers import PASSWORD, add_user, jsonl, serving

from rlhfkit.config import RewardConfig, load_config
from rlhfkit.feedback.app import create_app
from rlhfkit.reward.train import train_reward_model

pytestmark = pytest.mark.integration

XSS = '<img src=x onerror="window.pwned=1">'
PROMPTS = [{"prompt": "Capital of France?", "id": "france"}, {"prompt": "What is 2+2?", "id": "sum"},
           {"prompt": "What colour is a clear daytime sky?", "id": "sky"}]
COMPLETIONS = [{"id": "france", "prompt": "Capital of France?", "completions": ["Paris.", "Lyon.", XSS]},
               {"id": "sum", "prompt": "What is 2+2?", "completions": ["4", "5", "22"]},
               {"id": "sky", "prompt": "What colour is a clear daytime sky?", "completions": ["Blue.", "Green.", "Red."]}]


@pytest.fixture(autouse=True)
def playwright_api():
    """Skipped without chromium or Playwright; under CI, a failure."""
    return require_chromium()


@pytest.fixture
def server(tmp_path, tiny_model):
    app = create_app(f"sqlite:///{tmp_path / 'feedback.db'}", model_dir=Path(tiny_model))
    add_user(app, "admin", "admin")  # what `rlhfkit feedback create-admin` does
    with serving(app) as base:
        yield base


@pytest.fixture
def browser(playwright_api):
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def login(browser, base: str, username: str, width: int = 1280):
    page = browser.new_context(base_url=base, viewport={"width": width, "height": 800}).new_page()
    page.goto("/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    return page


def card_texts(page) -> list[str]:
    return page.locator("#ranking > .card .completion").all_text_contents()


def card(page, text: str):
    return page.locator("#ranking > .card").filter(has=page.locator(".completion", has_text=text)).first


def rank_by_dragging(page, best_first: list[str]) -> None:
    # The list in view first, as a person has it before dragging (Playwright would scroll in mid-drag otherwise).
    page.evaluate("document.getElementById('ranking').scrollIntoView({block: 'center'})")
    cards = page.locator("#ranking > .card")
    before = card_texts(page)
    cards.last.drag_to(cards.first, target_position={"x": 20, "y": 5})  # always at least one real drag
    assert card_texts(page) == before[-1:] + before[:-1]
    for index, text in enumerate(best_first):
        if card_texts(page)[index] != text:
            target = page.locator("#ranking > .card").nth(index)
            card(page, text).drag_to(target, target_position={"x": 20, "y": 5})  # upper edge: lands above it
    assert card_texts(page) == best_first


def rank_by_keyboard(page, best_first: list[str], tie_with_above: str | None = None) -> None:
    before = card_texts(page)
    card(page, before[0]).focus()
    page.keyboard.press("ArrowDown")  # always at least one move by key
    assert card_texts(page) == [before[1], before[0], *before[2:]]
    for index, text in enumerate(best_first):
        card(page, text).focus()
        for _ in range(card_texts(page).index(text) - index):
            page.keyboard.press("ArrowUp")
    assert card_texts(page) == best_first
    if tie_with_above:
        card(page, tie_with_above).focus()
        page.keyboard.press("t")


def rank_by_buttons(page, best_first: list[str]) -> None:
    """With the cards' ↑/↓ buttons, as on a phone (no drag-and-drop by touch)."""
    before = card_texts(page)
    card(page, before[0]).locator(".move-down").click()  # always at least one move by button
    assert card_texts(page) == [before[1], before[0], *before[2:]]
    for index, text in enumerate(best_first):
        for _ in range(card_texts(page).index(text) - index):
            card(page, text).locator(".move-up").click()
    assert card_texts(page) == best_first


def rate_by_keys(page, keys: str) -> None:
    """From the top card: one key per rating (helpful, honest, harmless), the focus moving on card by card."""
    page.locator("#ranking > .card").first.focus()
    for key in keys:
        page.keyboard.press(key)


def ranks_shown(page) -> dict[str, str]:
    return dict(zip(card_texts(page), page.locator("#ranking > .card .rank-badge").all_text_contents()))


def submit_by_keys(page, submitted_before: int) -> None:
    page.keyboard.press("Control+Enter")
    page.wait_for_selector(f"text={submitted_before + 1} submitted")


def test_admin_to_exported_pairs_with_two_annotators_and_a_control_item(server, browser, tmp_path, tiny_model):
    admin, project_url = admin_sets_up_a_project(browser, server, tmp_path)
    pid = project_url.rsplit("/", 1)[1]
    alice_ranks_by_keyboard_and_by_dragging(browser, server, pid, tmp_path)
    bob_on_a_phone_fails_the_control_item(browser, server, pid, tmp_path)
    admin_sees_agreement_and_exports_pairs_that_train(admin, project_url, pid, tmp_path, tiny_model)


def admin_sets_up_a_project(browser, server, tmp_path):
    """Two annotators, a project from files, bob added on its page, the sky item marked as a control item."""
    (tmp_path / "prompts.jsonl").write_bytes(jsonl(PROMPTS))
    (tmp_path / "completions.jsonl").write_bytes(jsonl(COMPLETIONS))
    admin = login(browser, server, "admin")
    admin.goto("/admin/users")
    for name in ("alice", "bob"):
        admin.fill("#add-user input[name=username]", name)
        admin.fill("#add-user input[name=password]", PASSWORD)
        admin.click("#add-user button")
    assert admin.locator("#users tbody tr").count() == 3
    admin.screenshot(path=tmp_path / "admin-users.png", full_page=True)
    admin.goto("/admin")
    admin.fill("#new-project input[name=name]", "browser")
    admin.fill("#new-project input[name=k]", "3")
    admin.check("#new-project input[value=ratings]")
    admin.check("#new-project input[name=members][value=alice]")
    admin.fill("#new-project input[name=control_percent]", "100")  # the control item comes first: the test knows when
    admin.fill("#new-project textarea[name=guidelines]", "# Guidelines\n\nPrefer **correct** answers.")
    admin.click("#new-project button[type=submit]")
    admin.wait_for_url("**/admin/projects/*")
    project_url = admin.url
    admin.set_input_files("#import-prompts input[type=file]", tmp_path / "prompts.jsonl")
    admin.click("#import-prompts button")
    assert "imported 3 prompts" in admin.text_content(".notice")
    admin.set_input_files("#import-completions input[type=file]", tmp_path / "completions.jsonl")
    admin.click("#import-completions button")
    assert "imported 3 completions" in admin.text_content(".notice")
    admin.check("#add-members input[value=bob]")  # bob joins the project on its page
    admin.click("#add-members button")
    assert admin.locator("#members li").all_text_contents()[1].startswith("bob")
    admin.fill("#find-item input[name=external_id]", "sky")  # the control item: "Blue." is the known best
    admin.click("#find-item button")
    admin.select_option("select[aria-label='known rank of completion 1']", "1")
    admin.click("#control button[type=submit]")
    assert "control item now" in admin.text_content(".notice") and admin.is_visible("#control-badge")
    return admin, project_url


def alice_ranks_by_keyboard_and_by_dragging(browser, server, pid: str, tmp_path) -> None:
    alice = login(browser, server, "alice")
    alice.goto(f"/projects/{pid}/annotate")
    assert alice.text_content("#prompt") == "What colour is a clear daytime sky?"  # nothing marks it as a control
    assert set(ranks_shown(alice).values()) == {"–"}  # no ranking until a card is moved
    rate_by_keys(alice, "555" * 3)
    alice.click("#submit")  # untouched: the page says so and nothing is sent
    assert "Rank the completions first" in alice.text_content("#ranking-state")
    assert alice.url.endswith("/annotate")
    rank_by_keyboard(alice, ["Blue.", "Green.", "Red."])
    submit_by_keys(alice, 0)

    assert alice.text_content("#prompt") == "Capital of France?"
    assert XSS in card_texts(alice)  # shown as text ...
    assert alice.evaluate("window.pwned") is None  # ... and never run
    alice.fill("#ideal", "Paris is the capital of France.")
    alice.reload()  # the draft survives a reload (kept in the browser until submitted)
    assert alice.input_value("#ideal") == "Paris is the capital of France."
    rank_by_dragging(alice, ["Paris.", "Lyon.", XSS])
    assert ranks_shown(alice) == {"Paris.": "1", "Lyon.": "2", XSS: "3"}
    rate_by_keys(alice, "554" "443" "115")
    assert alice.locator("input[type=radio]:checked").count() == 9
    alice.screenshot(path=tmp_path / "alice-dragged.png", full_page=True)
    alice.click("#submit")
    alice.wait_for_selector("text=2 submitted")
    assert alice.text_content("#prompt") == "What is 2+2?"
    rank_by_keyboard(alice, ["4", "5", "22"], tie_with_above="22")
    assert ranks_shown(alice) == {"4": "1", "5": "2", "22": "2 (tie)"}
    rate_by_keys(alice, "555" "222" "212")
    alice.screenshot(path=tmp_path / "alice-keyboard-tie.png")
    submit_by_keys(alice, 2)
    alice.wait_for_selector("#queue-empty")


def bob_on_a_phone_fails_the_control_item(browser, server, pid: str, tmp_path) -> None:
    bob = login(browser, server, "bob", width=390)  # a phone-sized screen
    bob.goto(f"/projects/{pid}/annotate")
    assert bob.evaluate("document.documentElement.scrollWidth") <= 390  # nothing sticks out sideways
    assert "Prefer" in bob.text_content("details.guidelines")  # the guidelines are on the page
    bob.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    box = bob.locator("#prompt").bounding_box()
    assert box["y"] >= 0 and box["y"] + box["height"] <= 800  # the prompt stays in view at the bottom of the page
    bob.screenshot(path=tmp_path / "bob-390px.png")
    rank_by_keyboard(bob, ["Red.", "Green.", "Blue."])  # the control item, answered wrongly
    rate_by_keys(bob, "333" * 3)
    submit_by_keys(bob, 0)
    rank_by_keyboard(bob, ["Paris.", "Lyon.", XSS])
    rate_by_keys(bob, "444" * 3)
    submit_by_keys(bob, 1)
    bob.check("#all-equal")  # then changes his mind: a real order, by the buttons a phone has
    assert set(ranks_shown(bob).values()) == {"1", "1 (tie)"}
    rank_by_buttons(bob, ["4", "5", "22"])
    assert not bob.is_checked("#all-equal")
    rate_by_keys(bob, "444" * 3)
    submit_by_keys(bob, 2)
    bob.wait_for_selector("#queue-empty")


def admin_sees_agreement_and_exports_pairs_that_train(admin, project_url: str, pid: str, tmp_path, tiny_model) -> None:
    admin.goto(project_url)
    # 6 comparisons: all agree but 5 vs 22 (alice tied them, bob put 5 first) -> 5/6. The control item is not data.
    assert admin.text_content("#pairwise-agreement") == "83.3%"
    assert "2 fully annotated, 1 control item;" in " ".join(admin.text_content("#progress").split())
    assert admin.locator("#agreement tbody tr").count() == 4  # ranking and the three ratings
    accuracy = admin.locator("#annotators .control-accuracy").all_text_contents()
    assert accuracy == ["100.0% (1 item)", "0.0% (1 item)"]  # alice, bob
    admin.screenshot(path=tmp_path / "admin-agreement.png", full_page=True)
    export = admin.request.get(f"/admin/projects/{pid}/export/pairs")
    pairs = {(p["prompt"], p["chosen"], p["rejected"]) for p in map(json.loads, export.text().splitlines())}
    assert pairs == {
        ("Capital of France?", "Paris.", "Lyon."), ("Capital of France?", "Paris.", XSS),
        ("Capital of France?", "Lyon.", XSS),
        ("What is 2+2?", "4", "5"), ("What is 2+2?", "4", "22"), ("What is 2+2?", "5", "22"),  # bob's vote decides
    }
    with admin.expect_download() as download:  # without bob, who failed the control item: alice's tie stands
        admin.click("#export-filtered button")
    filtered = {(p["prompt"], p["chosen"], p["rejected"])
                for p in map(json.loads, Path(download.value.path()).read_text().splitlines())}
    assert filtered == pairs - {("What is 2+2?", "5", "22")}
    # The downloaded file trains a reward model as is.
    (tmp_path / "pairs.jsonl").write_text(export.text())
    cfg = load_config(RewardConfig, None, [f"model={tiny_model}", f"train_file={tmp_path / 'pairs.jsonl'}",
                                           f"output_dir={tmp_path / 'rm'}", "max_steps=2"])
    train_reward_model(cfg)
    assert (tmp_path / "rm" / "config.json").is_file()


def test_sampling_job_progress_is_shown_until_done(server, browser, tmp_path, tiny_model):
    (tmp_path / "prompts.csv").write_text("prompt\n" + "".join(f"Question number {i}?\n" for i in range(6)))
    admin = login(browser, server, "admin")
    admin.goto("/admin")
    admin.fill("#new-project input[name=name]", "sampled")
    admin.fill("#new-project input[name=k]", "2")
    admin.click("#new-project button[type=submit]")
    admin.wait_for_url("**/admin/projects/*")
    admin.set_input_files("#import-prompts input[type=file]", tmp_path / "prompts.csv")
    admin.click("#import-prompts button")
    admin.fill("#generate input[name=model]", tiny_model)
    admin.fill("#generate input[name=max_new_tokens]", "16")
    admin.click("#generate button")
    admin.wait_for_selector("#jobs progress")
    admin.screenshot(path=tmp_path / "job-started.png", full_page=True)
    # The page polls the job and reloads itself when it ends; nothing here reloads it.
    admin.wait_for_selector("#jobs .job-status:has-text('done: 6/6')", timeout=60_000)
    admin.wait_for_selector("#progress:has-text('6 with completions')")  # the page reloaded itself
    admin.screenshot(path=tmp_path / "job-done.png", full_page=True)
