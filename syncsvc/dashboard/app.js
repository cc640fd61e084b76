// The operator dashboard: renders /dashboard/data.json and polls it every ~2 s.
// Data is only ever written with textContent (never as HTML), so nothing from a calendar,
// a tenant name or an error message can run as code.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const STATUS_TEXT = {
    ok: "ok",
    throttled: "throttled",
    failing: "failing",
    reconnect_needed: "reconnect needed",
  };
  let pollMs = 2000;
  let timer = null;
  let failedPolls = 0;

  // --- small DOM helpers --------------------------------------------------------------------

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children || []) if (child) node.append(child);
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    return node;
  }

  function replace(id, nodes) {
    document.getElementById(id).replaceChildren(...nodes);
  }

  function fmtInt(n) {
    return Number(n).toLocaleString("en-US");
  }

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function fmtAge(seconds) {
    if (seconds === null || seconds === undefined) return "—";
    if (seconds < 60) return Math.round(seconds) + " s";
    if (seconds < 3600) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "—";
    return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(1) + " s";
  }

  // "caldav:https://host/alice/cal/" → "alice/cal" (the host is in the tooltip);
  // "graph:ck@contoso.com" → "ck@contoso.com".
  function shortMailbox(mailbox) {
    const rest = mailbox.slice(mailbox.indexOf(":") + 1);
    const url = rest.match(/^https?:\/\/[^/]+\/(.+?)\/?$/);
    return url ? url[1] : rest;
  }

  function mailboxCell(mailbox) {
    return el("td", { class: "mailbox", title: mailbox }, [
      el("span", { class: "prov", text: mailbox.split(":")[0] }),
      el("span", { class: "addr", text: shortMailbox(mailbox) }),
    ]);
  }

  function num(value, cls) {
    return el("td", { class: "n" + (cls && value ? " " + cls : ""), text: fmtInt(value) });
  }

  function emptyRow(columns, text) {
    return el("tr", { class: "empty" }, [el("td", { colspan: columns, text: text })]);
  }

  // --- sections -----------------------------------------------------------------------------

  function renderTiles(data) {
    const sum = (key) => data.lanes.reduce((total, lane) => total + lane[key], 0);
    const done = data.chart.points.reduce((total, p) => total + p.done, 0);
    const active = data.batches.filter((b) => b.state === "syncing" || b.state === "deleting").length;
    const throttled = data.chart.points.reduce((total, p) => total + p.throttled, 0);
    const attention = data.health.filter((h) => h.status !== "ok").length;
    const tiles = [
      ["Batches in progress", fmtInt(active), ""],
      ["Done, 10 min", fmtInt(Math.round(done)), ""],
      ["Pending", fmtInt(sum("pending")), ""],
      ["Running", fmtInt(sum("running")), ""],
      ["Dead", fmtInt(data.dead_total), data.dead_total ? "bad" : ""],
      ["Throttled, 10 min", fmtInt(Math.round(throttled)), throttled ? "warn" : ""],
      ["Mailboxes needing care", fmtInt(attention), attention ? "bad" : ""],
    ];
    replace(
      "tiles",
      tiles.map(([label, value, cls]) =>
        el("div", { class: "tile " + cls }, [
          el("div", { class: "tile-value", text: value }),
          el("div", { class: "tile-label", text: label }),
        ]),
      ),
    );
  }

  function renderChart(data) {
    const chart = document.getElementById("chart");
    const width = chart.clientWidth || 600;
    const height = chart.clientHeight || 180;
    const pad = { left: 40, right: 10, top: 10, bottom: 22 };
    const points = data.chart.points;
    const bucket = data.chart.bucket_s;
    const perS = (value) => value / bucket;
    const peak = Math.max(0.5, ...points.map((p) => perS(p.done + p.failed + p.throttled)));
    const top = niceCeil(peak);
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const x = (i) => pad.left + (i / Math.max(points.length, 1)) * plotW;
    const y = (v) => pad.top + plotH - (v / top) * plotH;
    const barW = Math.max(plotW / Math.max(points.length, 1) - 1, 1);
    const nodes = [];
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    for (let step = 0; step <= 4; step++) {
      const value = (top * step) / 4;
      nodes.push(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value), class: "grid" }));
      const label = svg("text", { x: pad.left - 6, y: y(value) + 4, class: "axis", "text-anchor": "end" });
      label.textContent = value >= 10 ? Math.round(value) : value.toFixed(1);
      nodes.push(label);
    }
    points.forEach((p, i) => {
      // Failed and throttled as stacked bars at the bottom, done as the area above them.
      let base = 0;
      for (const [key, cls] of [["failed", "bar failed"], ["throttled", "bar throttled"]]) {
        const value = perS(p[key]);
        if (value > 0) {
          nodes.push(svg("rect", { x: x(i) + 0.5, y: y(base + value), width: barW, height: y(base) - y(base + value), class: cls }));
          base += value;
        }
      }
    });
    const line = points.map((p, i) => `${i === 0 ? "M" : "L"}${(x(i) + barW / 2).toFixed(1)},${y(perS(p.done)).toFixed(1)}`).join(" ");
    const area = `${line} L${(x(points.length - 1) + barW / 2).toFixed(1)},${y(0)} L${(x(0) + barW / 2).toFixed(1)},${y(0)} Z`;
    nodes.push(svg("path", { d: area, class: "area done" }));
    nodes.push(svg("path", { d: line, class: "line done" }));
    for (let i = 0; i < points.length; i += 12) {
      const label = svg("text", { x: x(i), y: height - 6, class: "axis" });
      label.textContent = fmtTime(points[i].t).slice(0, 5);
      nodes.push(label);
    }
    const nowLabel = svg("text", { x: width - pad.right, y: height - 6, class: "axis", "text-anchor": "end" });
    nowLabel.textContent = "now";
    nodes.push(nowLabel);
    chart.replaceChildren(...nodes);
  }

  function niceCeil(value) {
    const magnitude = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (step * magnitude >= value) return step * magnitude;
    return 10 * magnitude;
  }

  function renderHealth(data) {
    const bad = data.health.filter((h) => h.status !== "ok").length;
    document.getElementById("health-note").textContent =
      data.health.length ? `${data.health.length} mailboxes, ${bad} need care` : "";
    const queued = {};
    for (const lane of data.lanes) queued[lane.mailbox] = (queued[lane.mailbox] || 0) + lane.pending + lane.running;
    const items = data.health.slice(0, 12).map((h) =>
      el("li", { class: "health-item " + h.status, title: h.mailbox }, [
        el("span", { class: "pill " + h.status, text: STATUS_TEXT[h.status] || h.status }),
        el("div", { class: "health-main" }, [
          el("div", { class: "addr" }, [el("span", { class: "prov", text: h.provider }), shortMailbox(h.mailbox)]),
          el("div", {
            class: "muted small",
            text: h.last_error
              ? `${h.users.length ? "user " + h.users.join(", ") + " · " : ""}${h.last_error}`
              : [queued[h.mailbox] ? fmtInt(queued[h.mailbox]) + " queued" : "",
                 h.last_cycle_at ? "last cycle " + fmtTime(h.last_cycle_at) : ""].filter(Boolean).join(" · ") || "idle",
          }),
        ]),
      ]),
    );
    replace("health", items.length ? items : [el("li", { class: "empty", text: "No mailboxes yet." })]);
  }

  function progressBar(sync, compact) {
    const deleting = sync.deleting + sync.deleted > 0 && sync.synced + sync.pending === 0;
    const total = sync.pending + sync.synced + sync.failed + sync.deleting + sync.deleted;
    const segments = deleting
      ? [["deleted", sync.deleted], ["failed", sync.failed], ["waiting", sync.deleting]]
      : [["synced", sync.synced], ["failed", sync.failed], ["waiting", sync.pending + sync.deleting]];
    const bar = el("div", { class: "bar-track" + (compact ? " compact" : ""), role: "progressbar",
      "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": deleting ? sync.deleted : sync.synced });
    for (const [cls, value] of segments) {
      if (value > 0 && total > 0) {
        // Through the CSSOM: the page's CSP allows no inline style attributes.
        const seg = el("div", { class: "seg " + cls });
        seg.style.width = `${(100 * value) / total}%`;
        bar.append(seg);
      }
    }
    return bar;
  }

  function renderBatches(data) {
    const rows = data.batches.map((b) => {
      const s = b.sync;
      const ledger = s.pending + s.synced + s.failed + s.deleting + s.deleted;
      const deleting = b.state === "deleting" || b.state === "deleted";
      const doneCount = deleting ? s.deleted : s.synced;
      const users = el("div", { class: "users" },
        b.users.map((u) => {
          const us = u.sync;
          const utotal = us.pending + us.synced + us.failed + us.deleting + us.deleted;
          return el("div", { class: "user", title: `${u.name} (${u.id})` }, [
            el("span", { class: "user-name", text: u.name }),
            progressBar(us, true),
            el("span", { class: "user-count", text: `${deleting ? us.deleted : us.synced}/${utotal}` }),
          ]);
        }));
      return el("div", { class: "batch", "data-batch": b.id }, [
        el("div", { class: "batch-head" }, [
          el("span", { class: "state " + b.state, text: b.state }),
          el("span", { class: "batch-name", text: b.targetgroup_name || "batch " + b.id.slice(0, 8) }),
          el("span", { class: "muted batch-who", text: b.tenant_name + (b.users.length === 1 ? " · " + b.users[0].name : "") }),
          el("span", { class: "batch-count", text: `${fmtInt(doneCount)} / ${fmtInt(ledger)}${s.failed ? " · " + fmtInt(s.failed) + " failed" : ""}` }),
        ]),
        progressBar(s, false),
        b.users.length > 1 ? users : null,
      ]);
    });
    replace("batches", rows.length ? rows : [el("p", { class: "empty", text: "No batches yet." })]);
  }

  function renderQueue(data) {
    const rows = data.lanes.map((lane) =>
      el("tr", {}, [
        mailboxCell(lane.mailbox),
        el("td", {}, [el("span", { class: "lane " + lane.lane, text: lane.lane })]),
        el("td", { class: "n", title: lane.waiting ? `${lane.waiting} backing off or paused` : null,
          text: fmtInt(lane.pending) + (lane.waiting ? " ⏸" : "") }),
        num(lane.running),
        num(lane.dead, "bad"),
        el("td", { class: "n", text: fmtAge(lane.oldest_pending_age_s) }),
      ]),
    );
    replace("queue", rows.length ? rows : [emptyRow(6, "The queue is empty.")]);
  }

  function renderFailures(data) {
    document.getElementById("dead-count").textContent = data.dead_total ? fmtInt(data.dead_total) : "";
    document.getElementById("retry-all").hidden = data.dead_total === 0;
    const rows = data.dead.map((op) =>
      el("tr", { "data-op": op.id }, [
        el("td", { text: fmtTime(op.failed_at) }),
        el("td", { text: op.tenant_name, title: op.user_id ? "user " + op.user_id : null }),
        mailboxCell(op.mailbox),
        el("td", { class: "error-text", title: op.last_error || "", text: op.last_error || "—" }),
        el("td", { class: "n", text: op.attempts }),
        el("td", { class: "n" }, [el("button", { class: "small retry", type: "button", "data-id": op.id, text: "Retry" })]),
      ]),
    );
    replace("failures", rows.length ? rows : [emptyRow(6, "No failures.")]);
  }

  function renderCycles(data) {
    const rows = data.cycles.map((c) =>
      el("tr", {}, [
        el("td", { text: fmtTime(c.started_at) }),
        mailboxCell(c.mailbox),
        num(c.done),
        num(c.failed, "bad"),
        num(c.throttled, "warn"),
        el("td", { class: "n", text: fmtMs(c.duration_ms) }),
      ]),
    );
    replace("cycles", rows.length ? rows : [emptyRow(6, "No cycles yet.")]);
  }

  function render(data) {
    pollMs = data.poll_interval_ms || pollMs;
    renderTiles(data);
    renderChart(data);
    renderHealth(data);
    renderBatches(data);
    renderQueue(data);
    renderFailures(data);
    renderCycles(data);
    document.getElementById("updated").textContent = "updated " + fmtTime(data.now);
    document.getElementById("live").className = "dot live";
  }

  // --- polling and actions ------------------------------------------------------------------

  async function poll() {
    clearTimeout(timer);
    try {
      const answer = await fetch("/dashboard/data.json", { credentials: "same-origin", cache: "no-store" });
      if (answer.status === 401) {
        window.location.assign("/dashboard/login");
        return;
      }
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      render(await answer.json());
      failedPolls = 0;
    } catch (err) {
      failedPolls += 1;
      document.getElementById("live").className = "dot stale";
      document.getElementById("updated").textContent = "cannot reach the service, retrying…";
    }
    timer = setTimeout(poll, failedPolls ? Math.min(pollMs * 2 ** failedPolls, 30000) : pollMs);
  }

  let toastTimer = null;
  function toast(text, bad) {
    const node = document.getElementById("toast");
    node.textContent = text;
    node.className = "toast" + (bad ? " bad" : "");
    node.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { node.hidden = true; }, 3000);
  }

  async function retry(body, button) {
    if (button) button.disabled = true;
    try {
      const answer = await fetch("/dashboard/retry", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        credentials: "same-origin",
        body: JSON.stringify(body),
      });
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      const result = await answer.json();
      toast(result.retried === 1 ? "1 operation queued again" : `${result.retried} operations queued again`);
    } catch (err) {
      toast("Retry failed: " + err.message, true);
      if (button) button.disabled = false;
    }
    poll();
  }

  document.getElementById("failures").addEventListener("click", (event) => {
    const button = event.target.closest("button.retry");
    if (button) retry({ ids: [Number(button.dataset.id)] }, button);
  });
  document.getElementById("retry-all").addEventListener("click", (event) => retry({ all: true }, event.target));
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/dashboard/logout", { method: "POST", credentials: "same-origin" });
    window.location.assign("/dashboard/login");
  });
  window.addEventListener("resize", () => poll());

  render(JSON.parse(document.getElementById("initial").textContent));
  timer = setTimeout(poll, pollMs);
})();
