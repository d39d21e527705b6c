// Keeps a persona's sample progress panel (above the form) up to date while its latest request is queued
// or running: polls the progress JSON, redraws the panel and adds new images to the gallery (below the
// form), then stops.
// Everything is built with textContent (never innerHTML): prompts, errors and labels are user data.
(function () {
  "use strict";

  const INTERVAL_MS = 1500;
  const MAX_BACKOFF_MS = 15000;

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function byDevice(rows) {
    return rows.map((row) => row.images + " on " + row.device).join(", ");
  }

  function renderProgress(panel, data) {
    const state = document.getElementById("request-state");
    if (state) {
      state.textContent = data.state_label;
      state.className = "request-state state-" + data.state;
    }
    const done = document.getElementById("request-done");
    if (done) done.textContent = String(data.done);
    const asked = document.getElementById("request-asked");
    if (asked) asked.textContent = String(data.asked);
    const bar = document.getElementById("request-progress");
    if (bar) {
      bar.max = data.asked;
      bar.value = data.done;
      bar.textContent = data.done + " / " + data.asked;
    }
    const devices = document.getElementById("request-devices");
    if (devices) devices.textContent = byDevice(data.by_device || []);
    const error = document.getElementById("request-error");
    if (error) {
      error.textContent = data.error || "";
      error.hidden = !data.error;
    }
    const cancel = document.getElementById("cancel-request-form");
    if (cancel) cancel.dataset.running = String(data.running || 0);
    const body = document.getElementById("request-attempts");
    if (body) {
      const rows = data.attempts.map((a) => {
        const tr = element("tr", "attempt state-" + a.state);
        tr.append(
          element("td", "", a.images),
          element("td", "", String(a.attempt)),
          element("td", "attempt-state", a.state_label),
          element("td", "", a.planned),
          element("td", "", a.device || "–"),
          element("td", "reason", a.reason),
          element("td", "error", a.error),
        );
        return tr;
      });
      body.replaceChildren(...rows);
    }
  }

  function figureFor(panel, image) {
    const figure = element("figure", "sample sample-new");
    figure.dataset.imageId = String(image.id);
    figure.dataset.requestId = String(image.request);
    figure.dataset.index = String(image.index);
    const link = document.createElement("a");
    link.href = image.url;
    link.target = "_blank";
    link.rel = "noopener";
    link.title = "Open the full image (" + image.width + "×" + image.height + " PNG)";
    const img = document.createElement("img");
    img.src = image.thumbnail || image.url;
    img.width = 128;
    img.height = 128;
    img.alt = "Sample " + (image.index + 1) + " of " + (panel.dataset.personaName || "persona") + ", seed " + image.seed;
    link.append(img);
    const caption = document.createElement("figcaption");
    caption.append(
      element("span", "seed", "seed " + image.seed),
      document.createElement("br"),
      element("span", "device", image.device || "unknown device"),
      document.createElement("br"),
      element("span", "model", image.model || ""),
    );
    figure.append(link, caption);
    return figure;
  }

  // The request's group on the page, made at the top (the newest request) when it has none yet.
  function groupFor(gallery, data) {
    const existing = Array.from(gallery.querySelectorAll("section.sample-group")).find(
      (g) => g.dataset.requestId === String(data.id),
    );
    if (existing) return existing;
    const group = element("section", "sample-group");
    group.dataset.requestId = String(data.id);
    const header = element("h3", "sample-group-header");
    header.append(
      "Request #" + data.id + " · " + (data.model ? data.model.name : "") + " · ",
      element("span", "sample-group-count", "0"),
      " of " + data.asked + " image" + (data.asked === 1 ? "" : "s"),
    );
    group.append(header, element("div", "sample-group-images"));
    gallery.insertBefore(group, gallery.firstChild);
    return group;
  }

  // New images join their request's group before the first image with a higher index: the order the
  // server renders (newest request first, request order within it). Only page 1 shows the newest
  // request; an older page is left as it is.
  function addImages(panel, data) {
    const gallery = document.getElementById("sample-gallery");
    if (!gallery || (gallery.dataset.page && gallery.dataset.page !== "1") || !data.images.length) return;
    const empty = document.getElementById("sample-gallery-empty");
    if (empty) empty.remove();
    const group = groupFor(gallery, data);
    const images = group.querySelector(".sample-group-images");
    for (const image of data.images) {
      if (gallery.querySelector('figure[data-image-id="' + image.id + '"]')) continue;
      const before = Array.from(images.querySelectorAll("figure.sample")).find((f) => Number(f.dataset.index) > image.index);
      images.insertBefore(figureFor(panel, image), before || null);
    }
    const count = group.querySelector(".sample-group-count");
    if (count) count.textContent = String(data.done);
  }

  // The request is no longer queued or running: nothing left to cancel.
  function removeCancel() {
    const cancel = document.getElementById("cancel-request-form");
    if (cancel) cancel.remove();
  }

  function stop(panel) {
    removeCancel();
    delete panel.dataset.active;
  }

  function start(panel) {
    const url = panel.dataset.progressUrl;
    const polling = document.getElementById("request-polling");
    let delay = INTERVAL_MS;
    if (polling) polling.hidden = false;

    async function poll() {
      let data;
      try {
        const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
        if (!response.ok) throw new Error("HTTP " + response.status);
        data = await response.json();
      } catch (error) {
        // The server restarting or a network blip: keep trying, but less often.
        delay = Math.min(delay * 2, MAX_BACKOFF_MS);
        if (polling) polling.textContent = "· not updating (" + error.message + "), retrying…";
        window.setTimeout(poll, delay);
        return;
      }
      delay = INTERVAL_MS;
      if (polling) polling.textContent = "· updating…";
      if (String(data.id) !== panel.dataset.requestId) {
        // Someone asked for a newer request (another tab, another admin): this page is stale.
        if (polling) polling.textContent = "· a newer request exists: reload the page to follow it";
        stop(panel);
        return;
      }
      renderProgress(panel, data);
      addImages(panel, data);
      if (data.active || data.running > 0) {
        // A cancelled request's running jobs still finish and add their images: follow them too.
        if (!data.active) removeCancel();
        window.setTimeout(poll, delay);
      } else {
        if (polling) polling.hidden = true;
        stop(panel);
      }
    }

    window.setTimeout(poll, INTERVAL_MS);
  }

  // Cancelling while jobs make images drops the queued ones only: say so and ask first. The form
  // stays a plain POST with its CSRF token; without JavaScript it posts at once.
  function confirmCancel(event) {
    const running = Number(event.currentTarget.dataset.running || 0);
    if (running < 1) return;
    const text =
      running + (running === 1 ? " job is" : " jobs are") + " making images right now. Cancel the request? " +
      "The queued jobs are dropped; the running ones finish and keep their images.";
    if (!window.confirm(text)) event.preventDefault();
  }

  function init() {
    const cancel = document.getElementById("cancel-request-form");
    if (cancel) cancel.addEventListener("submit", confirmCancel);
    const panel = document.getElementById("sample-progress");
    if (panel && panel.dataset.progressUrl && panel.dataset.active) start(panel);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
