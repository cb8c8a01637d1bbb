// The Batch scoring tab (batchscore.ui): polls the plugin's JSON report of one DAG run and draws, per
// deployment, its progress, a timeline of mini-batches per worker, its failures (each with a button that
// clears the mapped task instance through Airflow's REST API, as the viewer) and links to its records.
// No library, no build step: the page is served as it is. Data goes into the page as text, never as HTML.
"use strict";

(function () {
  const match = location.pathname.match(/^(.*)\/runs\/([^/]+)\/([^/]+)\/?$/);
  const prefix = match ? match[1] : "";
  const dagId = match ? decodeURIComponent(match[2]) : "";
  const runId = match ? decodeURIComponent(match[3]) : "";
  const airflowRoot = prefix.replace(/\/batchscore$/, "");
  const reportUrl = `${prefix}/api/runs/${encodeURIComponent(dagId)}/${encodeURIComponent(runId)}`;
  const POLL_MS = 3000; // while the run goes
  const IDLE_POLL_MS = 15000; // once it is over (a clear starts it again)
  const TERMINAL = ["success", "failed"];

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  const number = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.round(seconds);
    if (s < 60) return `${s}s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  function progress(d) {
    const p = d.progress;
    const total = Math.max(p.mini_batches_total, 1);
    const bar = el("div", { class: "bar", role: "img", "aria-label": "mini-batches" });
    for (const key of ["succeeded", "failed", "running", "queued"]) {
      const count = p[`mini_batches_${key}`];
      if (count > 0) bar.append(el("div", { class: key, style: `width:${(100 * count) / total}%`, title: `${count} ${key}` }));
    }
    const done = p.mini_batches_succeeded + p.mini_batches_failed;
    const numbers = el("dl", { class: "numbers" });
    const items = [
      ["mini-batches", "mini-batches", `${number(done)} of ${number(p.mini_batches_total)} done`],
      ["failed", "mini-batches-failed", number(p.mini_batches_failed)],
      ["running", "mini-batches-running", number(p.mini_batches_running)],
      ["queued", "mini-batches-queued", number(p.mini_batches_queued)],
      ["items", "items", `${number(p.items_succeeded + p.items_failed)} of ${number(p.items_total)} done`],
      ["items failed", "items-failed", number(p.items_failed)],
      ["rows", "rows", number(p.rows)],
      ["rows/s", "rows-per-second", p.rows_per_second === null ? "–" : Number(p.rows_per_second).toFixed(1)],
      ["elapsed", "elapsed", duration(p.elapsed_seconds)],
      ["ETA", "eta", duration(p.eta_seconds)],
    ];
    for (const [label, key, value] of items) numbers.append(el("div", {}, el("dt", {}, label), el("dd", { "data-key": key }, value)));
    return [bar, numbers];
  }

  function timeline(d) {
    const t = d.timeline;
    if (!t.lanes.length) return el("p", { class: "muted" }, "No mini-batch has started yet.");
    const start = Date.parse(t.start);
    const span = Math.max(Date.parse(t.end) - start, 1);
    const label = 110, width = 900, row = 22;
    const chart = svg("svg", { class: "timeline", viewBox: `0 0 ${label + width + 10} ${t.lanes.length * row + 18}`, role: "img" });
    t.lanes.forEach((lane, i) => {
      const y = i * row;
      chart.append(svg("text", { x: 0, y: y + 15 }, lane.worker));
      for (const b of lane.bars) {
        const x0 = label + (width * (Date.parse(b.start) - start)) / span;
        const x1 = label + (width * ((b.end ? Date.parse(b.end) : Date.parse(t.end)) - start)) / span;
        const rect = svg("rect", { x: x0, y: y + 3, width: Math.max(x1 - x0, 2), height: row - 6, rx: 2, class: b.state, "data-mini-batch": b.mini_batch });
        const took = ((b.end ? Date.parse(b.end) : Date.parse(t.end)) - Date.parse(b.start)) / 1000;
        rect.append(svg("title", {}, `${b.mini_batch}: ${b.state}, ${duration(took)}${b.rows ? `, ${b.rows} rows` : ""}`));
        chart.append(rect);
      }
    });
    chart.append(svg("text", { x: label, y: t.lanes.length * row + 14 }, new Date(start).toLocaleTimeString()));
    chart.append(svg("text", { x: label + width, y: t.lanes.length * row + 14, "text-anchor": "end" }, `+${duration(span / 1000)}`));
    return chart;
  }

  async function clearInstance(button, failure, out) {
    if (!button.classList.contains("confirm")) {
      button.classList.add("confirm");
      button.textContent = "Confirm: clear and rerun";
      return;
    }
    button.disabled = true;
    out.textContent = "Clearing…";
    const body = {
      dry_run: false,
      dag_run_id: runId,
      task_ids: [[failure.task_id, failure.map_index]],
      include_downstream: true,
      only_failed: false,
      reset_dag_runs: true,
    };
    try {
      const resp = await fetch(`${airflowRoot}/api/v2/dags/${encodeURIComponent(dagId)}/clearTaskInstances`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      if (!resp.ok) {
        const why = resp.status === 401 || resp.status === 403 ? "Airflow refused: you may not clear this DAG's tasks" : await resp.text();
        out.textContent = `Not cleared (HTTP ${resp.status}): ${why}`;
        button.disabled = false;
        return;
      }
      const cleared = (await resp.json()).task_instances || [];
      out.textContent = `Cleared ${failure.mini_batch} and ${cleared.length - 1} downstream task(s): the scheduler runs them again.`;
      out.setAttribute("data-cleared", String(cleared.length));
      schedule(500);
    } catch (e) {
      out.textContent = `Not cleared: ${e}`;
      button.disabled = false;
    }
  }

  function failures(d, state) {
    if (!d.failures_total) return el("p", { class: "muted", "data-key": "no-failures" }, "No failures.");
    const body = el("tbody");
    const buttonFor = new Set();
    for (const f of d.failures) {
      const action = el("td");
      const key = `${f.task_id}:${f.map_index}`;
      if (!buttonFor.has(key)) {
        buttonFor.add(key);
        const out = el("div", { class: "muted clear-result" });
        const button = el("button", { type: "button", class: "clear", "data-map-index": f.map_index, title: "Clear this mapped task instance and its downstream tasks, so Airflow runs them again" }, "Clear and rerun");
        const keep = state[key];
        if (keep) { button.className = keep.className; button.textContent = keep.text; button.disabled = keep.disabled; out.textContent = keep.out; }
        button.addEventListener("click", () => clearInstance(button, f, out));
        action.append(button, out);
      }
      body.append(el("tr", { "data-mini-batch": f.mini_batch },
        el("td", {}, f.mini_batch), el("td", {}, f.file || "–"), el("td", {}, f.record === null ? "–" : f.record),
        el("td", { class: "error" }, f.error), action));
    }
    const table = el("table", { class: "failures" },
      el("thead", {}, el("tr", {}, ...["mini-batch", "file", "record", "error", ""].map((h) => el("th", {}, h)))), body);
    const more = d.failures_total > d.failures.length ? el("p", { class: "muted" }, `${d.failures_total - d.failures.length} more in the errors file.`) : "";
    return el("div", {}, table, more);
  }

  function links(d) {
    const list = el("ul", { class: "links" });
    for (const key of ["output", "summary", "ledger", "errors"]) {
      const link = d.links[key];
      if (!link) { list.append(el("li", { class: "muted", "data-link": key }, `${key}: not yet`)); continue; }
      const item = link.href ? el("a", { href: `${prefix}/${link.href}`, "data-link": key }, link.name) : el("code", { "data-link": key }, link.location);
      list.append(el("li", {}, `${key}: `, item));
    }
    return list;
  }

  function deployment(d, state) {
    const section = el("section", { class: "deployment", "data-deployment": d.name });
    section.append(el("h2", {}, d.name, el("span", { class: `badge ${d.phase}`, "data-key": "phase" }, d.phase)));
    if (d.message) section.append(el("p", { class: "message", "data-key": "message" }, d.message));
    if (d.folder) section.append(el("p", { class: "muted" }, "Run folder: ", el("code", {}, d.folder)));
    if (d.progress.mini_batches_total) {
      section.append(...progress(d));
      if (d.summary) section.append(el("p", { "data-key": "summary-status" }, `Merged: ${d.summary.status}, ${number(d.summary.rows)} rows.`));
      section.append(el("h3", {}, "Timeline (mini-batches per worker)"), timeline(d));
      section.append(el("h3", {}, `Failures (${d.failures_total})`), failures(d, state));
    }
    section.append(el("h3", {}, "Records"), links(d));
    return section;
  }

  // What a clear button shows survives the redraw of the next poll.
  function buttonState() {
    const state = {};
    document.querySelectorAll("section.deployment").forEach((s) => {
      s.querySelectorAll("button.clear").forEach((b) => {
        const row = b.closest("td");
        const out = row.querySelector(".clear-result");
        const name = s.getAttribute("data-deployment");
        state[`${name}.score:${b.getAttribute("data-map-index")}`] = { className: b.className, text: b.textContent, disabled: b.disabled, out: out.textContent };
      });
    });
    return state;
  }

  let timer = null;
  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(poll, ms);
  }

  async function poll() {
    const error = document.getElementById("error");
    let next = POLL_MS;
    try {
      const resp = await fetch(reportUrl, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}: ${(await resp.text()).slice(0, 300)}`);
      const report = await resp.json();
      const state = buttonState();
      document.getElementById("run-id").textContent = `${report.dag_id} / ${report.run_id}`;
      const badge = document.getElementById("run-state");
      badge.textContent = report.state;
      badge.className = `badge ${report.state}`;
      document.getElementById("updated").textContent = `updated ${new Date(report.generated_at).toLocaleTimeString()}`;
      const main = document.getElementById("deployments");
      const sections = report.deployments.map((d) => deployment(d, state));
      if (!sections.length) sections.push(el("p", { class: "muted" }, "This DAG has no batchscore deployment."));
      main.replaceChildren(...sections);
      main.setAttribute("data-run-state", report.state);
      error.hidden = true;
      if (TERMINAL.includes(report.state)) next = IDLE_POLL_MS;
    } catch (e) {
      error.textContent = `The report could not be loaded: ${e.message}`;
      error.hidden = false;
    }
    schedule(next);
  }

  poll();
})();
