// Polls the running generation job and updates its progress bar until it ends, then reloads the page.
(function () {
  "use strict";
  const row = document.querySelector("[data-job-running]");
  if (!row) return;
  const bar = row.querySelector("progress");
  const text = row.querySelector(".job-status");
  function poll() {
    fetch("/api/jobs/" + row.dataset.jobRunning, { credentials: "same-origin" })
      .then(function (response) { return response.json(); })
      .then(function (job) {
        bar.max = Math.max(job.total, 1);
        bar.value = job.done;
        text.textContent = job.status + ": " + job.done + "/" + job.total + " " + job.message;
        if (job.status === "running" || job.status === "queued") setTimeout(poll, 1000);
        else window.location.reload();
      });
  }
  setTimeout(poll, 1000);
})();
