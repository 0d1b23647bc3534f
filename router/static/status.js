// Omnirouter status page: polls /v1/status every 2 s and redraws the board.
// Every value goes into the page through textContent, never parsed as HTML: subjects
// customers wrote, agent names and driver errors stay text, whatever they contain.
"use strict";

const POLL_MS = 2000;

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [key, value] of Object.entries(attrs || {})) tr.setAttribute(key, value);
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...rows);
  if (!rows.length) {
    const td = el("td", empty, "muted");
    td.colSpan = columns;
    tbody.appendChild(row([td]));
  }
}

function duration(seconds) {
  const s = Math.abs(seconds);
  const sign = seconds < 0 ? "-" : "";
  if (s < 60) return sign + Math.round(s) + " s";
  if (s < 3600) return sign + Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return sign + Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function ago(ts, now) {
  return ts ? duration(now - ts) + " ago" : "never";
}

function cell(text, cls, label) {
  const td = el("td", text, cls);
  if (label) td.dataset.label = label; // shown before the value on a phone (no header row)
  return td;
}

function drawQueues(data) {
  const rows = data.queues.map((q) => {
    const frac = q.oldest_sla_s > 0 ? Math.min(1, q.oldest_wait_s / q.oldest_sla_s) : 1;
    const bar = el("td", null, "sla");
    const meter = el("span", null, "meter");
    const fillBar = el("span", null, frac >= 1 ? "bar over" : frac > 0.75 ? "bar warn" : "bar");
    fillBar.style.width = Math.round(frac * 100) + "%";
    meter.appendChild(fillBar);
    bar.append(meter, el("span", duration(q.oldest_wait_s) + " / " + duration(q.oldest_sla_s)));
    return row(
      [cell(q.queue), cell(q.label), cell(q.severity, "sev " + q.severity),
        cell(q.depth, "num", "waiting"),
        cell(q.overdue, q.overdue ? "num bad" : "num", "past SLA"), bar],
      { "data-queue": q.queue + "/" + q.label + "/" + q.severity });
  });
  fill($("queues"), rows, "Nothing waits.", 6);
  const rowsW = data.waiting.map((w) =>
    row([cell(w.ticket, "mono"), cell(w.label), cell(w.severity, "sev " + w.severity),
      cell(w.channel_type), cell(duration(w.wait_s), "num", "waited"),
      cell(duration(w.due_s), w.due_s < 0 ? "num bad" : "num", "due in"),
      cell(w.excerpt, "excerpt")],
    { "data-ticket": w.ticket }));
  fill($("waiting"), rowsW, "Nothing waits.", 7);
}

function drawAgents(data) {
  const rows = data.agents.map((a) => {
    const who = el("td");
    who.append(el("strong", a.id));
    if (a.name && a.name !== a.id) who.append(el("span", " " + a.name, "muted"));
    const load = el("td", null, "load");
    for (const p of a.load) {
      const chip = el("span", (p.channel_type === "*" ? "any" : p.channel_type) + " " +
        p.used + "/" + p.capacity, p.used >= p.capacity ? "chip full" : "chip");
      load.appendChild(chip);
    }
    return row([who, cell(a.presence, "presence " + a.presence),
      cell(a.on_shift ? "in shift" : "off shift", a.on_shift ? "" : "muted"), load, cell(a.tool)],
    { "data-agent": a.id });
  });
  fill($("agents"), rows, "No agents.", 5);
}

function drawDrivers(data) {
  const rows = Object.entries(data.drivers).map(([name, d]) =>
    row([cell(name), cell(d.kind + " · " + d.type),
      cell(d.state, d.state === "connected" || d.state === "standby" ? "state ok" : "state bad"),
      cell(ago(d.last_success, data.now), "", "last success"),
      cell(d.last_error || "no error", "excerpt")],
    { "data-driver": name }));
  fill($("drivers"), rows, "No channels or adapters.", 5);
  $("store").textContent = "store " + data.store;
}

function drawDead(data) {
  const dead = data.dead_letters;
  $("dead-count").textContent = dead.count + " in all, newest first";
  const rows = dead.newest.map((d) =>
    row([cell(ago(d.dead_at, data.now)), cell(d.target), cell(d.agent_id || "—"), cell(d.kind),
      cell(d.attempts, "num", "attempts"), cell(d.reason, "excerpt")], { "data-dead": d.id }));
  fill($("dead"), rows, "No dead letters.", 6);
}

function drawCrisis(data) {
  const list = $("crisis");
  const open = data.crisis.open;
  const items = open.map((c) =>
    el("li", c.reason.replace("_", " ") + " (" + c.key + "), raised " +
      ago(c.started_at, data.now), "bad"));
  if (!items.length) {
    items.push(el("li", data.crisis.enabled ? "None open." : "Crisis detection is off.", "muted"));
  }
  list.replaceChildren(...items);
}

function draw(data) {
  $("login").hidden = true;
  $("board").hidden = false;
  $("logout").hidden = false;
  const ready = $("ready");
  ready.textContent = data.ready ? "ready" : data.stopping ? "stopping" : "degraded";
  ready.className = "pill " + (data.ready ? "ok" : "bad");
  $("t-waiting").textContent = data.waiting_total;
  $("t-overdue").textContent = data.queues.reduce((n, q) => n + q.overdue, 0);
  $("t-agents").textContent =
    data.agents.filter((a) => a.presence === "on").length + "/" + data.agents.length;
  $("t-dead").textContent = data.dead_letters.count;
  $("t-crisis").textContent = data.crisis.open.length;
  drawCrisis(data);
  drawQueues(data);
  drawAgents(data);
  drawDrivers(data);
  drawDead(data);
  $("updated").textContent = "v" + data.version + " · updated " +
    new Date().toLocaleTimeString();
  $("updated").classList.remove("bad");
}

function showLogin() {
  $("board").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-failed").hidden = new URLSearchParams(location.search).get("login") !== "failed";
  $("ready").textContent = "log in";
  $("ready").className = "pill";
}

async function poll() {
  try {
    const resp = await fetch("/v1/status", { credentials: "same-origin", cache: "no-store" });
    if (resp.status === 401) {
      showLogin();
      return; // polling again only makes sense after a login (which reloads the page)
    }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    draw(await resp.json());
  } catch (err) {
    const updated = $("updated");
    updated.textContent = "cannot reach the daemon (" + err.message + "), retrying";
    updated.classList.add("bad");
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", poll);
