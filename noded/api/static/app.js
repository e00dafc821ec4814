// The status page: reads the node's own JSON API and redraws every REFRESH_MS. No build step.
"use strict";
const REFRESH_MS = 10000;
const base = new URL(".", window.location.href);

function fmtBytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}
function pct(x) { return x === null || x === undefined ? "-" : (x * 100).toFixed(1) + "%"; }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
async function getJSON(path) {
  const r = await fetch(new URL(path, base), { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

function renderMirrors(list) {
  const tbody = document.querySelector("#mirrors tbody");
  tbody.replaceChildren();
  if (!list.length) {
    const tr = el("tr"); tr.appendChild(el("td", { colspan: "8" }, "no mirrors configured")); tbody.appendChild(tr);
    return;
  }
  for (const m of list) {
    const tr = el("tr", { "data-mirror": m.name, "data-status": m.status });
    tr.appendChild(el("td", {}, m.name));
    tr.appendChild(el("td", {}, m.kind));
    const st = el("td"); st.appendChild(el("span", { class: "status " + m.status }, m.status)); tr.appendChild(st);
    tr.appendChild(el("td", {}, m.latency_ms === null ? "-" : m.latency_ms.toFixed(0) + " ms"));
    tr.appendChild(el("td", {}, pct(m.uptime_24h)));
    tr.appendChild(el("td", {}, pct(m.uptime_7d)));
    tr.appendChild(el("td", {}, String(m.open_reports)));
    tr.appendChild(el("td", { class: "reason" }, m.reason || ""));
    tbody.appendChild(tr);
  }
}

function renderDatasets(list) {
  const tbody = document.querySelector("#datasets tbody");
  tbody.replaceChildren();
  if (!list.length) {
    const tr = el("tr"); tr.appendChild(el("td", { colspan: "4" }, "no datasets known yet")); tbody.appendChild(tr);
    return;
  }
  for (const d of list) {
    const tr = el("tr", { "data-dataset": d.key, "data-verification": d.verification });
    const name = el("td", {}, d.key);
    if (d.magnet) {
      name.appendChild(document.createTextNode(" "));
      name.appendChild(el("a", { href: d.magnet, class: "magnet", title: "magnet link (trackers, peers, web seeds)" }, "magnet"));
    }
    tr.appendChild(name);
    tr.appendChild(el("td", {}, d.state_here));
    tr.appendChild(el("td", {}, d.verification === "unverified" ? "unverified (size only)" : d.verification));
    const td = el("td");
    for (const l of d.locations) {
      const cls = "status " + (l.working ? (l.match === "match" ? "up" : "unknown") : "down");
      const chip = el("span", { class: cls, "data-origin": l.origin, "data-match": l.match, title: l.url + (l.note ? " — " + l.note : "") },
        l.origin + ": " + l.match);
      td.appendChild(chip); td.appendChild(document.createTextNode(" "));
    }
    if (d.conflict) td.appendChild(el("div", { class: "reason" }, "conflict: " + d.conflict));
    tr.appendChild(td);
    tbody.appendChild(tr);
  }
}

function renderChart(hours) {
  const svg = document.getElementById("traffic-chart");
  const NS = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const W = 720, H = 200, pad = 24, n = hours.length;
  const max = Math.max(1, ...hours.map(h => h.in + h.out));
  const bw = (W - pad) / n;
  hours.forEach((h, i) => {
    const x = pad + i * bw;
    let y = H - pad;
    for (const dir of ["in", "out"]) {
      const hgt = (h[dir] / max) * (H - 2 * pad);
      const r = document.createElementNS(NS, "rect");
      r.setAttribute("x", x + 1); r.setAttribute("width", Math.max(1, bw - 2));
      r.setAttribute("y", y - hgt); r.setAttribute("height", hgt);
      r.setAttribute("class", "bar " + dir);
      const t = document.createElementNS(NS, "title");
      t.textContent = new Date(h.hour_start * 1000).toISOString().slice(11, 16) + " UTC " + dir + " " + fmtBytes(h[dir]);
      r.appendChild(t);
      svg.appendChild(r);
      y -= hgt;
    }
    if (i % 3 === 0) {
      const lbl = document.createElementNS(NS, "text");
      lbl.setAttribute("x", x); lbl.setAttribute("y", H - 8);
      lbl.textContent = new Date(h.hour_start * 1000).toISOString().slice(11, 13) + "h";
      svg.appendChild(lbl);
    }
  });
  const top = document.createElementNS(NS, "text");
  top.setAttribute("x", 2); top.setAttribute("y", 12);
  top.textContent = "max " + fmtBytes(max) + "/h";
  svg.appendChild(top);
}

function renderReports(list) {
  const ul = document.getElementById("reports");
  ul.replaceChildren();
  if (!list.length) { ul.appendChild(el("li", {}, "none")); return; }
  for (const r of list) {
    const when = new Date(r.created_at * 1000).toISOString().replace("T", " ").slice(0, 16);
    ul.appendChild(el("li", { "data-report": String(r.id) },
      `#${r.id} ${when} UTC — ${r.mirror}: ${r.kind}${r.item ? " (" + r.item + ")" : ""}${r.detail ? " — " + r.detail : ""}`));
  }
}

function renderFailing(list) {
  const tbody = document.querySelector("#failing tbody");
  tbody.replaceChildren();
  for (const it of list) {
    if (it.state === "wanted" && it.cause !== "waiting") continue;
    const tr = document.createElement("tr");
    const next = it.next_attempt ? new Date(it.next_attempt * 1000).toISOString().slice(0, 19).replace("T", " ") : "";
    for (const v of [it.key, it.origin, it.state, it.cause || "", next, it.reason || ""]) {
      const td = document.createElement("td");
      td.textContent = v;  // never innerHTML: keys and reasons come from listings
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
}

async function refresh() {
  try {
    const [status, mirrors, traffic, reports, failing, datasets] = await Promise.all([
      getJSON("v1/status"), getJSON("v1/mirrors"), getJSON("v1/traffic"), getJSON("v1/reports?status=open&limit=50"),
      getJSON("v1/items?state=failed,wanted&limit=200").catch(() => ({ items: [] })),  // a node without origins
      getJSON("v1/datasets?limit=100").catch(() => ({ datasets: [] })),
    ]);
    document.getElementById("node-name").textContent = `${status.node} (${status.region})`;
    const c = status.cache;
    const share = c.budget_bytes ? c.used_bytes / c.budget_bytes : 0;
    document.getElementById("cache-bar").style.width = Math.min(100, share * 100).toFixed(1) + "%";
    document.getElementById("cache-text").textContent =
      `${fmtBytes(c.used_bytes)} of ${fmtBytes(c.budget_bytes)} (${pct(share)}), ${c.cached_items} items, ` +
      `${status.push_backlog.items} not yet in R2`;
    const rep = document.getElementById("replicas-text");
    if (status.replicas) {
      const low = status.replicas.at_risk.slice(0, 3).map(x => `${x.key} (${x.copies})`).join(", ");
      rep.textContent = `${status.replicas.sentence}` + (low ? ` — fewest: ${low}` : "");
      rep.hidden = false;
    } else {
      rep.hidden = true;
    }
    const up = mirrors.mirrors.filter(m => m.status === "up").length;
    document.getElementById("summary").textContent =
      `version ${status.version} · ready ${status.ready} · mirrors up ${up}/${mirrors.mirrors.length}` +
      ` · ${Object.keys(status.problems).length} problem(s)`;
    renderMirrors(mirrors.mirrors);
    renderChart(traffic.last_24h);
    const q = traffic.quiet_hours;
    document.getElementById("quiet").textContent = q.length
      ? "Quiet hours in the coming day (UTC), best for big downloads: " + q.map(h => String(h).padStart(2, "0") + ":00").join(", ")
      : "Quiet hours: not enough traffic history yet.";
    document.getElementById("rates").textContent = "Now: " + (Object.entries(traffic.rates)
      .map(([ch, r]) => `${ch} ↓${fmtBytes(r.in)}/s ↑${fmtBytes(r.out)}/s`).join(" · ") || "idle");
    renderReports(reports.reports);
    renderFailing(failing.items);
    renderDatasets(datasets.datasets);
    document.getElementById("updated").textContent = "updated " + new Date().toISOString().slice(11, 19) + " UTC";
    document.getElementById("updated").classList.remove("error");
    document.body.dataset.ready = "1";
  } catch (e) {
    const u = document.getElementById("updated");
    u.textContent = "update failed: " + e.message;
    u.classList.add("error");
  }
}
refresh();
setInterval(refresh, REFRESH_MS);
