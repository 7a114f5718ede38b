"""End to end in a real browser (Debian's chromium driven by Playwright): an admin sets up a project from files,
adds two annotators; they rank by drag-and-drop and by keyboard alone (with a tie); the admin sees agreement,
the export holds the expected consensus pairs and trains a reward model. Screenshots go to pytest's tmp_path."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import pytest
import uvicorn
from feedback_helpers import PASSWORD, add_user, jsonl

from rlhfkit.config import RewardConfig, load_config
from rlhfkit.feedback.app import create_app
from rlhfkit.reward.train import train_reward_model

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason=f"needs {CHROMIUM} (apt-get install chromium)")
playwright_api = pytest.importorskip("playwright.sync_api")

XSS = '<img src=x onerror="window.pwned=1">'
PROMPTS = [{"prompt": "Capital of France?", "id": "france"}, {"prompt": "What is 2+2?", "id": "sum"}]
COMPLETIONS = [{"id": "france", "prompt": "Capital of France?", "completions": ["Paris.", "Lyon.", XSS]},
               {"id": "sum", "prompt": "What is 2+2?", "completions": ["4", "5", "22"]}]


@pytest.fixture
def server(tmp_path):
    app = create_app(f"sqlite:///{tmp_path / 'feedback.db'}")
    add_user(app, "admin", "admin")  # what `rlhfkit feedback create-admin` does
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def login(browser, base: str, username: str):
    page = browser.new_context(base_url=base).new_page()
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


def ranks_shown(page) -> dict[str, str]:
    return dict(zip(card_texts(page), page.locator("#ranking > .card .rank-badge").all_text_contents()))


def test_admin_to_exported_pairs_with_two_annotators(server, browser, tmp_path, tiny_model):
    (tmp_path / "prompts.jsonl").write_bytes(jsonl(PROMPTS))
    (tmp_path / "completions.jsonl").write_bytes(jsonl(COMPLETIONS))
    admin = login(browser, server, "admin")
    admin.goto("/admin")
    admin.fill("#new-project input[name=name]", "browser")
    admin.fill("#new-project input[name=k]", "3")
    admin.fill("#new-project textarea[name=guidelines]", "# Guidelines\n\nPrefer **correct** answers.")
    admin.click("#new-project button[type=submit]")
    admin.wait_for_url("**/admin/projects/*")
    project_url = admin.url
    admin.set_input_files("#import-prompts input[type=file]", tmp_path / "prompts.jsonl")
    admin.click("#import-prompts button")
    assert "imported 2 prompts" in admin.text_content(".notice")
    admin.set_input_files("#import-completions input[type=file]", tmp_path / "completions.jsonl")
    admin.click("#import-completions button")
    assert "imported 2 completions" in admin.text_content(".notice")
    admin.goto("/admin/users")
    for name in ("alice", "bob"):
        admin.fill("#add-user input[name=username]", name)
        admin.fill("#add-user input[name=password]", PASSWORD)
        admin.click("#add-user button")
    assert admin.locator("#users tbody tr").count() == 3
    admin.screenshot(path=tmp_path / "admin-users.png", full_page=True)

    pid = project_url.rsplit("/", 1)[1]
    alice = login(browser, server, "alice")
    alice.goto(f"/projects/{pid}/annotate")
    assert alice.text_content("#prompt") == "Capital of France?"
    assert XSS in card_texts(alice)  # shown as text ...
    assert alice.evaluate("window.pwned") is None  # ... and never run
    rank_by_dragging(alice, ["Paris.", "Lyon.", XSS])
    assert ranks_shown(alice) == {"Paris.": "1", "Lyon.": "2", XSS: "3"}
    alice.screenshot(path=tmp_path / "alice-dragged.png", full_page=True)
    alice.click("#submit")
    alice.wait_for_selector("text=1 submitted")
    assert alice.text_content("#prompt") == "What is 2+2?"
    rank_by_keyboard(alice, ["4", "5", "22"], tie_with_above="22")
    assert ranks_shown(alice) == {"4": "1", "5": "2", "22": "2 (tie)"}
    alice.screenshot(path=tmp_path / "alice-keyboard-tie.png", full_page=True)
    alice.focus("#submit")
    alice.keyboard.press("Enter")  # submitting by keyboard too
    alice.wait_for_selector("#queue-empty")

    bob = login(browser, server, "bob")
    bob.goto(f"/projects/{pid}/annotate")
    assert "Prefer" in bob.text_content("details.guidelines")  # the guidelines are on the page
    rank_by_keyboard(bob, ["Paris.", "Lyon.", XSS])
    bob.click("#submit")
    bob.wait_for_selector("text=1 submitted")
    rank_by_dragging(bob, ["4", "5", "22"])
    bob.click("#submit")
    bob.wait_for_selector("#queue-empty")

    admin.goto(project_url)
    # 6 comparisons: all agree but 5 vs 22 (alice tied them, bob put 5 first) -> 5/6.
    assert admin.text_content("#pairwise-agreement") == "83.3%"
    assert "2 fully annotated" in admin.text_content("#progress")
    assert admin.locator("#agreement tbody tr").count() == 1
    admin.screenshot(path=tmp_path / "admin-agreement.png", full_page=True)
    export = admin.request.get(f"/admin/projects/{pid}/export/pairs")
    pairs = {(p["prompt"], p["chosen"], p["rejected"]) for p in map(json.loads, export.text().splitlines())}
    assert pairs == {
        ("Capital of France?", "Paris.", "Lyon."), ("Capital of France?", "Paris.", XSS),
        ("Capital of France?", "Lyon.", XSS),
        ("What is 2+2?", "4", "5"), ("What is 2+2?", "4", "22"), ("What is 2+2?", "5", "22"),  # bob's vote decides
    }
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
    assert "6 with completions" in admin.text_content("#progress")
    admin.screenshot(path=tmp_path / "job-done.png", full_page=True)
