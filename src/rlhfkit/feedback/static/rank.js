// The annotate page: ranking K completions by drag-and-drop or by keyboard alone (ties allowed), one-key ratings,
// Submit/Skip keys, and a draft of the form kept in this browser until the answer is submitted.
//
// The order of the cards is the ranking; a card with data-tied="1" shares the rank of the card above it. The
// hidden rank_<position> inputs stay empty until the annotator moves or ties a card (or chooses "All equal"):
// the server refuses a ranking nobody touched, so the order first shown is never recorded by accident.
(function () {
  "use strict";
  const form = document.getElementById("answer");
  if (!form) return;
  const list = document.getElementById("ranking");
  const allEqual = document.getElementById("all-equal");
  const state = document.getElementById("ranking-state");
  const draftKey = form.dataset.draftKey;

  function cards() {
    return Array.from(form.querySelectorAll(".cards > .card"));
  }

  function ranked() {
    return list !== null && cards()[0].querySelector(".rank-input").value !== "";
  }

  // ---- ranking ----
  function renumber() {
    let rank = 0;
    cards().forEach(function (card, i) {
      if (i === 0) card.dataset.tied = "0";  // the top card has nobody to tie with
      if (card.dataset.tied !== "1") rank += 1;  // dense ranks: 1, 2, 2, 3
      card.querySelector(".rank-input").value = String(rank);
      card.querySelector(".rank-badge").textContent = card.dataset.tied === "1" ? rank + " (tie)" : String(rank);
      card.classList.toggle("tied", card.dataset.tied === "1");
    });
    state.textContent = allEqual.checked ? "Ranked: all equal." : "Ranked.";
    state.classList.remove("missing");
    saveDraft();
  }

  function leaveAllEqual() {
    // Moving or tying a card after "All equal" starts a real order: every tie of "All equal" goes.
    if (!allEqual.checked) return;
    allEqual.checked = false;
    cards().forEach(function (card) { card.dataset.tied = "0"; });
  }

  function move(card, step) {
    const sibling = step < 0 ? card.previousElementSibling : card.nextElementSibling;
    leaveAllEqual();
    card.dataset.tied = "0";  // a moved card leaves its tie group
    if (sibling) {
      if (step < 0) list.insertBefore(card, sibling);
      else list.insertBefore(sibling, card);
    }
    renumber();  // even a card that could not move is an answer: "this order"
    card.focus();
  }

  function toggleTie(card) {
    if (!card.previousElementSibling) return;
    leaveAllEqual();
    card.dataset.tied = card.dataset.tied === "1" ? "0" : "1";
    renumber();
  }

  function setAllEqual(on) {
    allEqual.checked = on;
    cards().forEach(function (card, i) { card.dataset.tied = on && i > 0 ? "1" : "0"; });
    renumber();
  }

  function setUpRanking() {
    let dragged = null;
    cards().forEach(function (card) {
      card.querySelector(".move-up").addEventListener("click", function () { move(card, -1); });
      card.querySelector(".move-down").addEventListener("click", function () { move(card, 1); });
      card.querySelector(".toggle-tie").addEventListener("click", function () { toggleTie(card); });
      card.addEventListener("dragstart", function (event) {
        dragged = card;
        card.classList.add("dragging");
        event.dataTransfer.effectAllowed = "move";
        event.dataTransfer.setData("text/plain", card.dataset.position);
      });
      card.addEventListener("dragend", function () {
        card.classList.remove("dragging");
        dragged = null;
      });
      card.addEventListener("dragover", function (event) {
        if (dragged && dragged !== card) event.preventDefault();  // allow dropping here
      });
      card.addEventListener("drop", function (event) {
        event.preventDefault();
        if (!dragged || dragged === card) return;
        // Dropped on the upper half of a card: place above it; on the lower half: below it.
        const box = card.getBoundingClientRect();
        const above = event.clientY < box.top + box.height / 2;
        leaveAllEqual();
        dragged.dataset.tied = "0";
        list.insertBefore(dragged, above ? card : card.nextElementSibling);
        renumber();
      });
    });
    allEqual.addEventListener("change", function () { setAllEqual(allEqual.checked); });
  }

  // ---- one-key ratings: on a focused card, 1-5 rate its first unrated aspect (then the next card) ----
  function rate(card, value) {
    const groups = Array.from(card.querySelectorAll(".rating"));
    if (!groups.length) return false;
    const open = groups.find(function (g) { return !g.querySelector("input:checked"); }) || groups[groups.length - 1];
    open.querySelector('input[value="' + value + '"]').checked = true;
    saveDraft();
    if (groups.every(function (g) { return g.querySelector("input:checked"); }) && card.nextElementSibling) {
      card.nextElementSibling.focus();
    }
    return true;
  }

  function onCardKey(card, event) {
    if (event.target !== card || event.ctrlKey || event.metaKey || event.altKey) return;  // keys typed into fields are theirs
    const key = event.key;
    let handled = true;
    if (list && key === "ArrowUp") move(card, -1);
    else if (list && key === "ArrowDown") move(card, 1);
    else if (list && (key === "t" || key === "T")) toggleTie(card);
    else if (list && key === "=") setAllEqual(!allEqual.checked);
    else if (/^[1-5]$/.test(key)) handled = rate(card, key);
    else handled = false;
    if (handled) event.preventDefault();
  }

  // ---- Submit and Skip ----
  function checkRanking(event) {
    if (list && !ranked()) {
      event.preventDefault();
      state.textContent = "Rank the completions first: move at least one card, or choose “All equal”.";
      state.classList.add("missing");
      cards()[0].focus();
    }
  }

  document.addEventListener("keydown", function (event) {
    if (!(event.ctrlKey || event.metaKey)) return;
    if (event.key === "Enter") {
      event.preventDefault();
      form.requestSubmit(document.getElementById("submit"));
    } else if (event.key === " " && document.getElementById("skip-form")) {
      event.preventDefault();
      if (window.confirm("Skip this item?")) document.getElementById("skip-form").submit();
    }
  });

  // ---- the draft: everything typed, kept in localStorage until the answer is submitted ----
  function saveDraft() {
    try {
      const fields = Array.from(new FormData(form).entries()).filter(function (e) { return e[0] !== "csrf_token"; });
      const order = cards().map(function (c) { return [c.dataset.position, c.dataset.tied]; });
      localStorage.setItem(draftKey, JSON.stringify({ fields: fields, order: order, ranked: ranked() }));
    } catch (e) { /* storage full or disabled: the draft is a convenience */ }
  }

  function restoreDraft() {
    let draft = null;
    try { draft = JSON.parse(localStorage.getItem(draftKey) || "null"); } catch (e) { return; }
    if (!draft) return;
    draft.fields.forEach(function (entry) {
      const name = entry[0], value = entry[1];
      form.querySelectorAll('[name="' + CSS.escape(name) + '"]').forEach(function (input) {
        if (input.type === "radio" || input.type === "checkbox") { if (input.value === value) input.checked = true; }
        else if (input.type !== "hidden") input.value = value;
      });
    });
    if (list && draft.ranked) {
      draft.order.forEach(function (pair) {
        const card = list.querySelector('.card[data-position="' + pair[0] + '"]');
        card.dataset.tied = pair[1];
        list.appendChild(card);
      });
      renumber();
    }
  }

  function forgetOtherDrafts() {
    // One item is held at a time: drafts of other items of this project were submitted or abandoned.
    const prefix = draftKey.split(":").slice(0, 3).join(":") + ":";
    Object.keys(localStorage).forEach(function (key) {
      if (key.startsWith(prefix) && key !== draftKey) localStorage.removeItem(key);
    });
  }

  // "Edit this one as the ideal response": copy the completion's text (as text) into the box.
  form.querySelectorAll(".use-as-ideal").forEach(function (button) {
    button.addEventListener("click", function () {
      const box = document.getElementById("ideal");
      box.value = button.closest(".card").querySelector(".completion").textContent;
      saveDraft();
      box.focus();
    });
  });

  // The sticky prompt's height, for the cards' scroll margin (app.css).
  const promptBox = document.getElementById("prompt-box");
  function notePromptHeight() {
    document.documentElement.style.setProperty("--prompt-height", promptBox.offsetHeight + "px");
  }
  notePromptHeight();
  window.addEventListener("resize", notePromptHeight);

  cards().forEach(function (card) {
    card.addEventListener("keydown", function (event) { onCardKey(card, event); });
  });
  if (list) setUpRanking();
  form.addEventListener("submit", checkRanking);
  form.addEventListener("input", saveDraft);
  form.addEventListener("change", saveDraft);
  try {
    forgetOtherDrafts();
    if (form.dataset.serverDraft !== "1") restoreDraft();  // the server's copy (a refused answer) comes first
  } catch (e) { /* no localStorage: nothing to restore */ }
})();
