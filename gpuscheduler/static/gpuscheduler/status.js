// GPU status page: every few seconds, fetch the page's data with its server-rendered fragments
// and swap them in, so cards, charts and tables stay current without a reload.
(function () {
  "use strict";

  function start() {
    var root = document.getElementById("gpu-status");
    if (!root) return;
    var seconds = Math.max(parseFloat(root.dataset.refreshSeconds) || 5, 1);
    var params = new URLSearchParams(window.location.search);
    params.set("fragments", "1");
    var url = root.dataset.url + "?" + params.toString();
    var updated = document.getElementById("gpu-status-updated");
    var error = document.getElementById("gpu-status-error");
    var parts = {
      storage: document.getElementById("gpu-storage"),
      cards: document.getElementById("gpu-cards"),
      queues: document.getElementById("gpu-queues"),
      assignments: document.getElementById("gpu-assignments"),
    };
    var timer = null;
    var busy = false;
    var stopped = false;

    function showError(text) {
      error.textContent = text;
      error.hidden = !text;
    }

    function refresh() {
      if (stopped || busy || document.hidden) return;
      busy = true;
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          var json = (response.headers.get("Content-Type") || "").indexOf("application/json") === 0;
          if (response.status === 403 || response.redirected || !json) {
            // Signed out or the permission was taken away: stop asking.
            stopped = true;
            window.clearInterval(timer);
            throw new Error("Not allowed any more: reload the page to sign in again.");
          }
          if (!response.ok) throw new Error("The server answered " + response.status + ".");
          return response.json();
        })
        .then(function (data) {
          Object.keys(parts).forEach(function (key) {
            if (parts[key] && data.html && typeof data.html[key] === "string") parts[key].innerHTML = data.html[key];
          });
          if (updated) updated.textContent = data.generated_text;
          showError("");
        })
        .catch(function (exc) {
          showError("Refresh failed: " + exc.message);
        })
        .finally(function () {
          busy = false;
        });
    }

    timer = window.setInterval(refresh, seconds * 1000);
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) refresh();
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
