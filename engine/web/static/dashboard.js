// engine dashboard: live rows (server-sent events), keyboard shortcuts, the theme toggle and
// the waterfall's details. Plain JavaScript, no build step, no dependency.
(function () {
  "use strict";
  const root = document.documentElement;

  // -- theme: the toggle's choice is remembered; otherwise the system's ---------------------
  const stored = localStorage.getItem("engine-theme");
  if (stored) root.dataset.theme = stored;
  function toggleTheme() {
    const dark = root.dataset.theme
      ? root.dataset.theme === "dark"
      : matchMedia("(prefers-color-scheme: dark)").matches;
    root.dataset.theme = dark ? "light" : "dark";
    localStorage.setItem("engine-theme", root.dataset.theme);
  }

  // -- lists: j/k select a row (or a bar), Enter or o opens it --------------------------------
  function list() { return document.querySelector("[data-list]"); }
  function rows() {
    const l = list();
    if (!l) return [];
    return Array.from(l.querySelectorAll("tbody tr[data-href], .wrow"));
  }
  function select(row) {
    for (const r of rows()) r.classList.toggle("selected", r === row);
    if (!row) return;
    row.scrollIntoView({ block: "nearest" });
    if (row.classList.contains("wrow")) {
      showDetail(row);
      history.replaceState(null, "", "#" + row.dataset.id);
    }
  }
  function move(step) {
    const all = rows();
    if (!all.length) return;
    const at = all.findIndex((r) => r.classList.contains("selected"));
    const next = at < 0 ? (step > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, at + step));
    select(all[next]);
  }
  function openSelected() {
    const row = rows().find((r) => r.classList.contains("selected"));
    if (row && row.dataset.href) location.href = row.dataset.href;
  }

  // -- the waterfall: a bar's details in the side panel ---------------------------------------
  function showDetail(row) {
    const bar = row.querySelector(".bar");
    const panel = document.getElementById("detail-panel");
    if (!bar || !panel) return;
    for (const d of panel.querySelectorAll(".detail")) d.hidden = d.id !== bar.dataset.detail;
    const hint = panel.querySelector("[data-placeholder]");
    if (hint) hint.hidden = true;
  }
  document.addEventListener("click", (e) => {
    const wrow = e.target.closest(".wrow");
    if (wrow) { select(wrow); return; }
    const tr = e.target.closest("tbody tr[data-href]");
    if (tr && !e.target.closest("a, button, input, select")) location.href = tr.dataset.href;
  });

  // -- live rows: the server sends the first rows whenever they change -------------------------
  function live(tbody) {
    const indicator = document.querySelector(".live");
    const source = new EventSource(tbody.dataset.live);
    source.addEventListener("rows", (e) => {
      const selected = rows().find((r) => r.classList.contains("selected"));
      const keep = selected && selected.dataset.id;
      const before = new Set(Array.from(tbody.querySelectorAll("tr[data-id]"), (r) => r.dataset.id));
      tbody.innerHTML = e.data;
      tick();
      for (const r of tbody.querySelectorAll("tr[data-id]")) {
        if (before.size && !before.has(r.dataset.id)) r.classList.add("fresh");
        if (keep && r.dataset.id === keep) r.classList.add("selected");
      }
      if (indicator) indicator.classList.remove("off");
    });
    source.onerror = () => { if (indicator) indicator.classList.add("off"); };
    window.addEventListener("pagehide", () => source.close());
  }
  // A run still going: the page reloads when it moves, keeping the selected bar (#bar-N).
  function watch(element) {
    const source = new EventSource(element.dataset.watch);
    source.addEventListener("rows", (e) => {
      if (e.data === element.dataset.moved) return;
      source.close();
      location.reload();
    });
    window.addEventListener("pagehide", () => source.close());
  }
  function restoreBar() {
    const id = location.hash.slice(1);
    const row = id && document.querySelector(`.wrow[data-id="${CSS.escape(id)}"]`);
    if (row) select(row);
  }
  // How long runs still going have taken so far (data-since: their start).
  function took(seconds) {
    if (seconds < 60) return seconds.toFixed(seconds < 10 ? 2 : 1) + "s";
    const whole = Math.floor(seconds);
    if (whole < 3600) return Math.floor(whole / 60) + "m" + String(whole % 60).padStart(2, "0") + "s";
    return Math.floor(whole / 3600) + "h" + String(Math.floor(whole % 3600 / 60)).padStart(2, "0") + "m";
  }
  function tick() {
    for (const element of document.querySelectorAll("[data-since]")) {
      const since = Date.parse(element.dataset.since);
      if (!isNaN(since)) element.textContent = took(Math.max(0, (Date.now() - since) / 1000)) + "…";
    }
  }
  setInterval(tick, 1000);
  document.addEventListener("DOMContentLoaded", () => {
    tick();
    for (const tbody of document.querySelectorAll("tbody[data-live]")) live(tbody);
    for (const element of document.querySelectorAll("[data-watch]")) watch(element);
    restoreBar();
    const toggle = document.getElementById("theme-toggle");
    if (toggle) toggle.addEventListener("click", toggleTheme);
    const help = document.getElementById("help-toggle");
    if (help) help.addEventListener("click", () => document.getElementById("help").showModal());
  });

  // -- keyboard ----------------------------------------------------------------------------
  let pendingG = 0;
  document.addEventListener("keydown", (e) => {
    const target = e.target;
    const typing = target.closest && target.closest("input, textarea, select, [contenteditable]");
    if (typing) {
      if (e.key === "Escape") target.blur();
      return;
    }
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (pendingG && Date.now() - pendingG < 1500) {
      pendingG = 0;
      const link = document.querySelector(`header nav a[data-shortcut="${CSS.escape(e.key)}"]`);
      if (link) { e.preventDefault(); location.href = link.href; }
      return;
    }
    switch (e.key) {
      case "g": pendingG = Date.now(); break;
      case "/": {
        const field = document.querySelector("[data-search]") || document.querySelector(".filters input, .filters select");
        if (field) { e.preventDefault(); field.focus(); if (field.select) field.select(); }
        break;
      }
      case "j": e.preventDefault(); move(1); break;
      case "k": e.preventDefault(); move(-1); break;
      case "Enter": case "o": openSelected(); break;
      case "t": toggleTheme(); break;
      case "?": document.getElementById("help").showModal(); break;
      default: return;
    }
  });
})();
