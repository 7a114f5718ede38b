// Ranking K completions by drag-and-drop or by keyboard alone, ties allowed.
// The order of the cards is the ranking; a card with data-tied="1" shares the rank of the card above it.
// Each card's hidden rank_<position> input is rewritten after every change, so the form posts plain ranks.
(function () {
  "use strict";
  const list = document.getElementById("ranking");

  function cards() {
    return Array.from(list.querySelectorAll(":scope > .card"));
  }

  function renumber() {
    let rank = 0;
    cards().forEach(function (card, i) {
      if (i === 0) card.dataset.tied = "0";  // the top card has nobody to tie with
      if (card.dataset.tied !== "1") rank += 1;  // dense ranks: 1, 2, 2, 3
      card.querySelector(".rank-input").value = String(rank);
      card.querySelector(".rank-badge").textContent = card.dataset.tied === "1" ? rank + " (tie)" : String(rank);
      card.classList.toggle("tied", card.dataset.tied === "1");
    });
  }

  function move(card, step) {
    const sibling = step < 0 ? card.previousElementSibling : card.nextElementSibling;
    if (!sibling) return;
    card.dataset.tied = "0";  // a moved card leaves its tie group
    if (step < 0) list.insertBefore(card, sibling);
    else list.insertBefore(sibling, card);
    renumber();
    card.focus();
  }

  function toggleTie(card) {
    if (!card.previousElementSibling) return;
    card.dataset.tied = card.dataset.tied === "1" ? "0" : "1";
    renumber();
  }

  function setUpRanking() {
    let dragged = null;
    cards().forEach(function (card) {
      card.addEventListener("keydown", function (event) {
        if (event.target !== card) return;  // keys typed into the card's own fields are theirs
        if (event.key === "ArrowUp") { move(card, -1); event.preventDefault(); }
        else if (event.key === "ArrowDown") { move(card, 1); event.preventDefault(); }
        else if (event.key === "t" || event.key === "T") { toggleTie(card); event.preventDefault(); }
      });
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
        dragged.dataset.tied = "0";
        list.insertBefore(dragged, above ? card : card.nextElementSibling);
        renumber();
      });
    });
    renumber();
  }

  // "Edit this one as the ideal response": copy the completion's text (as text) into the box.
  document.querySelectorAll(".use-as-ideal").forEach(function (button) {
    button.addEventListener("click", function () {
      const box = document.getElementById("ideal");
      box.value = button.closest(".card").querySelector(".completion").textContent;
      box.focus();
    });
  });

  if (list) setUpRanking();
})();
