// Mosaic web view: fills the page shells from the JSON API and keeps them live with
// server-sent events. No framework; charts with uPlot (shipped in this folder).
"use strict";

const TOKEN = document.querySelector('meta[name="mosaic-token"]').content;
const PAGE = document.body.dataset.page;
const PARAMS = new URLSearchParams(location.search);
const STATES = ["queued", "running", "paused", "done", "failed", "cancelled"];
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777",
                "#4b5563", "#65a30d", "#9333ea"];
const $ = (id) => document.getElementById(id);
// What the tests and the benchmark read: timings (performance.now()) and the charts.
window.mosaic = { timing: {}, charts: {} };

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function fmt(value, digits = 4) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return esc(value);
  if (Number.isInteger(value)) return String(value);
  const abs = Math.abs(value);
  return abs !== 0 && (abs < 1e-3 || abs >= 1e6) ? value.toExponential(digits - 1)
                                                 : String(Number(value.toPrecision(digits)));
}

async function api(path, params = {}) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (Array.isArray(v)) v.forEach((x) => query.append(k, x));
    else if (v !== undefined && v !== null && v !== "") query.set(k, v);
  }
  const response = await fetch(`${path}?${query}`, { headers: { "X-Mosaic-Token": TOKEN } });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function post(action, body = {}) {
  const response = await fetch(`/api/${action}`, {
    method: "POST", body: JSON.stringify(body),
    headers: { "X-Mosaic-Token": TOKEN, "Content-Type": "application/json" },
  });
  const reply = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(reply.error || response.statusText);
  return reply.reply;
}

function message(text, error = false) {
  const el = $("message");
  if (!el) return;
  el.textContent = text;
  el.classList.toggle("error", error);
}

function badge(state) {
  return `<span class="badge ${esc(state)}">${esc(state)}</span>`;
}

function progress(epoch, epochs) {
  const share = epochs ? Math.min(100, (100 * epoch) / epochs) : 0;
  return `<span class="progress"><i style="width:${share.toFixed(0)}%"></i></span>` +
         `${epoch}/${epochs}`;
}

function studyUrl(db) { return `/study?db=${encodeURIComponent(db)}`; }
function runUrl(db, id) { return `/run?db=${encodeURIComponent(db)}&id=${id}`; }
function baseName(path) { return path.split("/").pop(); }

function crumbs(items) {
  $("crumbs").innerHTML = items.map(([text, href]) => `<a href="${href}">${esc(text)}</a>`)
    .join("");
}

// -- the daemon's live state (all pages but the run page) ------------------------------------

const live = { state: null, listeners: [] };

function connectLive(onChange) {
  live.listeners.push(onChange);
  const source = new EventSource("/events");
  const dot = $("live");
  source.addEventListener("open", () => dot.classList.add("on"));
  source.addEventListener("error", () => dot.classList.remove("on"));
  source.addEventListener("snapshot", (e) => {
    live.state = JSON.parse(e.data);
    live.listeners.forEach((f) => f(live.state, null));
  });
  source.addEventListener("diff", (e) => {
    const change = JSON.parse(e.data);
    const s = live.state;
    if (change.daemon) s.daemon = change.daemon;
    if (change.workers) s.workers = change.workers;
    Object.assign(s.studies, change.studies || {});
    (change.removed || []).forEach((db) => delete s.studies[db]);
    live.listeners.forEach((f) => f(s, change));
  });
}

function countsHtml(counts) {
  return STATES.filter((s) => counts[s]).map(
    (s) => `<span class="count" data-state="${s}">${counts[s]} ${s}</span>`).join("") ||
    '<span class="sub">no runs</span>';
}

// -- overview ----------------------------------------------------------------------------------

function renderDaemon(d) {
  const el = $("daemon");
  if (!d.up) {
    el.innerHTML = `${badge("down")} <span id="daemon-state" data-state="down">daemon ` +
      `unreachable</span> <span class="sub">${esc(d.error || "")}</span>`;
  } else {
    const state = d.paused ? "paused" : "running";
    const owners = d.paused_owners && d.paused_owners.length
      ? ` · submissions of uid ${d.paused_owners.join(", ")} held` : "";
    el.innerHTML = `mosaicd <span id="daemon-state" data-state="${state}">` +
      `${badge(state)}</span> · <span id="queued">${d.queued}</span> queued${esc(owners)}`;
  }
  for (const id of ["pause", "pause-now", "resume"]) $(id).disabled = !d.up;
}

function renderWorkers(workers) {
  const mib = (v) => (v === null || v === undefined ? "–" : `${fmt(v)} MiB`);
  $("workers").tBodies[0].innerHTML = workers.map((w) => {
    const gpu = w.gpu_mib !== null && w.gpu_mib !== undefined ? mib(w.gpu_mib)
      : w.gpu_device_mib !== null && w.gpu_device_mib !== undefined
        ? `${mib(w.gpu_device_mib)} / ${mib(w.gpu_total_mib)} (card)` : "–";
    return `<tr><td>${esc(w.id)}</td><td>${esc(w.slot)}</td><td>${esc(w.state)}</td>` +
      `<td>${esc(w.pid)}</td><td>${w.run_id ?? "–"}</td>` +
      `<td class="num">${fmt(w.cpu_percent)}</td><td class="num">${mib(w.rss_mib)}</td>` +
      `<td class="num">${gpu}</td><td class="num">${fmt(w.runs_done)}</td></tr>`;
  }).join("") || '<tr><td colspan="9" class="sub">no worker</td></tr>';
}

function renderStudies(studies) {
  const rows = Object.values(studies).map((s) => {
    const running = s.running.map((r) =>
      `<div><a class="run" href="${runUrl(s.db, r.run_id)}">run ${r.run_id}</a> ` +
      `${progress(r.epoch, r.epochs)} <span class="sub">test_loss ${fmt(r.test_loss)}` +
      `</span></div>`).join("");
    const where = s.daemon ? "" : ' <span class="sub">(file, not served by the daemon)</span>';
    return `<tr><td><a href="${studyUrl(s.db)}">${esc(s.db)}</a>${where}</td>` +
      `<td><div class="counts">${countsHtml(s.counts)}</div></td><td>${running}</td>` +
      `<td><a href="/compare?db=${encodeURIComponent(s.db)}">compare</a></td></tr>`;
  });
  $("studies").tBodies[0].innerHTML = rows.join("") ||
    '<tr><td colspan="4" class="sub">no study yet: `mosaic run CONFIG DB` starts one</td></tr>';
}

function control(action, body, done) {
  message(`${action}…`);
  post(action, body).then((reply) => message(done(reply)))
    .catch((err) => message(`${action} refused: ${err.message}`, true));
}

function initOverview() {
  crumbs([]);
  connectLive((s, change) => {
    if (!change || change.daemon) renderDaemon(s.daemon);
    if (!change || change.workers) renderWorkers(s.workers);
    if (!change || change.studies || change.removed) renderStudies(s.studies);
    window.mosaic.timing.rendered = performance.now();
  });
  const scope = (r) => (r.scope === "owner" ? "your submissions are" : "the daemon is");
  $("pause").onclick = () => control("pause", { now: false },
    (r) => `paused: ${scope(r)} held, no new run starts; running runs finish`);
  $("pause-now").onclick = () => control("pause", { now: true },
    (r) => `paused: ${scope(r)} held; parking ${r.parking} running run(s) at their next ` +
           "epoch boundary");
  $("resume").onclick = () => control("resume", {},
    (r) => `resumed; ${r.resumed} parked run(s) continue from their checkpoint`);
}

// -- study -------------------------------------------------------------------------------------

const RESULT_COLUMNS = ["train_loss", "test_loss", "train_acc", "test_acc", "nb_params",
                        "duration(s)", "epochs"];

function initStudy() {
  const db = PARAMS.get("db");
  const view = {
    status: (PARAMS.get("status") || "").split(",").filter(Boolean),
    filters: PARAMS.getAll("filter"),
    sort: PARAMS.get("sort") || "run_id", desc: PARAMS.get("desc") === "1",
    offset: Number(PARAMS.get("offset") || 0), limit: Number(PARAMS.get("limit") || 50),
  };
  let keys = [];
  let running = {};
  let selected = new Set();
  let requestNo = 0;
  let refreshTimer = null;
  $("title").textContent = db;
  $("compare-link").href = `/compare?db=${encodeURIComponent(db)}`;
  $("page-size").value = String(view.limit);
  crumbs([[baseName(db), studyUrl(db)]]);

  function remember() {
    const q = new URLSearchParams({ db });
    if (view.status.length) q.set("status", view.status.join(","));
    view.filters.forEach((f) => q.append("filter", f));
    if (view.sort !== "run_id") q.set("sort", view.sort);
    if (view.desc) q.set("desc", "1");
    if (view.offset) q.set("offset", view.offset);
    if (view.limit !== 50) q.set("limit", view.limit);
    history.replaceState(null, "", `/study?${q}`);
  }

  function header() {
    const cols = [["", null], ["run", "run_id"], ["status", "status"], ["progress", null],
      ...keys.map((k) => [k, `param:${k}`]), ["pipeline", "pipeline"],
      ...RESULT_COLUMNS.map((c) => [c, c])];
    $("runs").tHead.innerHTML = "<tr>" + cols.map(([label, sort]) => {
      if (!sort) return `<th>${esc(label)}</th>`;
      const classes = RESULT_COLUMNS.includes(sort) || sort === "run_id" ? ["num"] : [];
      if (view.sort === sort) classes.push("sorted", ...(view.desc ? ["desc"] : []));
      return `<th data-sort="${esc(sort)}" class="${classes.join(" ")}">${esc(label)}</th>`;
    }).join("") + "</tr>";
    $("runs").tHead.querySelectorAll("th[data-sort]").forEach((th) => {
      th.onclick = () => {
        const sort = th.dataset.sort;
        view.desc = view.sort === sort ? !view.desc : false;
        view.sort = sort;
        view.offset = 0;
        window.mosaic.timing.sortClicked = performance.now();
        load("sorted");
      };
    });
  }

  function progressCell(row) {
    const r = running[row.run_id];
    return r ? progress(r.epoch, r.epochs) : "";
  }

  function render(page) {
    const rows = page.rows.map((row) => {
      const checked = selected.has(row.run_id) ? " checked" : "";
      const open = ["queued", "running", "paused"].includes(row.status);
      return `<tr data-run="${row.run_id}"><td>${open ? `<input type="checkbox" ` +
        `data-run="${row.run_id}"${checked} aria-label="select run ${row.run_id}">` : ""}</td>` +
        `<td class="num"><a class="run" href="${runUrl(db, row.run_id)}">${row.run_id}</a></td>` +
        `<td>${badge(row.status)}</td><td class="progress-cell">${progressCell(row)}</td>` +
        keys.map((k) => `<td>${fmt(row.params[k])}</td>`).join("") +
        `<td class="pipe">${esc(row.pipeline)}</td>` +
        RESULT_COLUMNS.map((c) => `<td class="num">${fmt(row.results[c])}</td>`).join("") +
        "</tr>";
    });
    $("runs").tBodies[0].innerHTML = rows.join("") ||
      `<tr><td colspan="${6 + keys.length + RESULT_COLUMNS.length}" class="sub">no run ` +
      "matches</td></tr>";
    $("runs").tBodies[0].querySelectorAll("input[type=checkbox]").forEach((box) => {
      box.onchange = () => {
        const id = Number(box.dataset.run);
        if (box.checked) selected.add(id); else selected.delete(id);
        $("cancel-selected").disabled = selected.size === 0;
      };
    });
    const last = Math.min(page.offset + page.limit, page.total);
    $("range").textContent = page.total
      ? `runs ${page.offset + 1}–${last} of ${page.total}` : "no run";
    $("range").dataset.total = page.total;
    $("prev").disabled = page.offset === 0;
    $("next").disabled = last >= page.total;
  }

  async function load(why) {
    const mine = ++requestNo;
    remember();
    header();
    try {
      const page = await api("/api/runs", {
        db, status: view.status.join(","), filter: view.filters, sort: view.sort,
        desc: view.desc ? "1" : "", offset: view.offset, limit: view.limit,
        show: keys.join(",") });
      if (mine !== requestNo) return; // a newer request is on its way
      render(page);
      message("");
      window.mosaic.timing[why] = performance.now();
    } catch (err) {
      message(err.message, true);
    }
  }

  function renderFilters(summary) {
    $("states").innerHTML = STATES.map((s) =>
      `<label><input type="checkbox" value="${s}"${view.status.includes(s) ? " checked" : ""}>` +
      ` ${s} <span class="sub" data-count="${s}">${summary.counts[s] || 0}</span></label>`)
      .join("");
    $("states").querySelectorAll("input").forEach((box) => {
      box.onchange = () => {
        view.status = [...$("states").querySelectorAll("input:checked")].map((b) => b.value);
        view.offset = 0;
        load("filtered");
      };
    });
    $("keys").innerHTML = Object.entries(summary.keys).map(([name, values]) => {
      const current = (view.filters.find((f) => f.startsWith(`${name}=`)) || "")
        .slice(name.length + 1);
      return `<label>${esc(name)} <select data-key="${esc(name)}"><option value="">all</option>` +
        values.map((v) => `<option${String(v) === current ? " selected" : ""}>${esc(v)}</option>`)
          .join("") + "</select></label>";
    }).join("");
    $("keys").querySelectorAll("select").forEach((sel) => {
      sel.onchange = () => {
        const name = sel.dataset.key;
        view.filters = view.filters.filter((f) => !f.startsWith(`${name}=`));
        if (sel.value) view.filters.push(`${name}=${sel.value}`);
        view.offset = 0;
        renderChips();
        load("filtered");
      };
    });
    renderChips();
  }

  function renderChips() {
    $("chips").innerHTML = view.filters.map((f, i) =>
      `<span class="chip" data-i="${i}" title="remove this filter">${esc(f)}</span>`).join("");
    $("chips").querySelectorAll(".chip").forEach((chip) => {
      chip.onclick = () => {
        view.filters.splice(Number(chip.dataset.i), 1);
        view.offset = 0;
        renderChips();
        load("filtered");
      };
    });
  }

  function renderCounts(counts) {
    $("counts").innerHTML = countsHtml(counts);
    for (const s of STATES) {
      const el = document.querySelector(`[data-count="${s}"]`);
      if (el) el.textContent = counts[s] || 0;
    }
  }

  $("param-form").onsubmit = (e) => {
    e.preventDefault();
    const text = $("param-filter").value.trim();
    if (!text) return;
    view.filters.push(text);
    $("param-filter").value = "";
    view.offset = 0;
    renderChips();
    load("filtered");
  };
  $("prev").onclick = () => { view.offset = Math.max(0, view.offset - view.limit); load("paged"); };
  $("next").onclick = () => { view.offset += view.limit; load("paged"); };
  $("page-size").onchange = () => {
    view.limit = Number($("page-size").value);
    view.offset = 0;
    load("paged");
  };
  $("cancel-selected").onclick = () => {
    const ids = [...selected];
    control("cancel", { db, ids }, (r) => {
      selected = new Set();
      $("cancel-selected").disabled = true;
      load("refreshed");
      return `cancelled ${r.cancelled.length} run(s)` +
        (r.skipped.length ? `; ${r.skipped.length} had already finished` : "");
    });
  };

  api("/api/study", { db }).then((summary) => {
    keys = Object.keys(summary.keys);
    renderFilters(summary);
    renderCounts(summary.counts);
    // A tuned study: each search's progress (docs/tuning.md).
    $("searches").innerHTML = (summary.search_lines || []).map((line) =>
      `<li>${esc(line)}</li>`).join("");
    return load("firstRows");
  }).catch((err) => message(err.message, true));

  let lastCounts = null;
  connectLive((s) => {
    const study = s.studies[db];
    if (!study) return;
    renderCounts(study.counts);
    running = Object.fromEntries(study.running.map((r) => [r.run_id, r]));
    document.querySelectorAll("#runs tbody tr[data-run]").forEach((tr) => {
      const r = running[Number(tr.dataset.run)];
      tr.querySelector(".progress-cell").innerHTML = r ? progress(r.epoch, r.epochs) : "";
    });
    // Runs changed state: reload the page shown, at most every 2 s.
    const key = JSON.stringify(study.counts);
    if (lastCounts !== null && key !== lastCounts && !refreshTimer) {
      refreshTimer = setTimeout(() => { refreshTimer = null; load("refreshed"); }, 2000);
    }
    lastCounts = key;
  });
}

// -- run ---------------------------------------------------------------------------------------

function lineChart(el, series, yLabel) {
  const width = Math.max(320, el.clientWidth - 4);
  const opts = {
    width, height: 240,
    scales: { x: { time: false } },
    // Whole epochs only on the x axis.
    axes: [{ label: "epoch", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000] },
           { label: yLabel, size: 60 }],
    series: [{ label: "epoch" }, ...series.map((name, i) => ({
      label: name, stroke: COLORS[i], width: 2, points: { show: true, size: 5 },
      spanGaps: true }))],
  };
  const data = [[], ...series.map(() => [])];
  const chart = new uPlot(opts, data, el);
  return { chart, data, series };
}

function initRun() {
  const db = PARAMS.get("db");
  const id = Number(PARAMS.get("id"));
  crumbs([[baseName(db), studyUrl(db)], [`run ${id}`, runUrl(db, id)]]);
  $("title").innerHTML = `run ${id} <span id="run-status"></span>`;
  const loss = lineChart($("loss-chart"), ["train_loss", "test_loss"], "loss");
  const acc = lineChart($("acc-chart"), ["train_acc", "test_acc"], "accuracy");
  window.mosaic.charts = { loss: loss.chart, acc: acc.chart };
  let lastEpoch = 0;

  function addEpochs(points) {
    for (const p of points) {
      if (p.epoch <= lastEpoch) continue;
      lastEpoch = p.epoch;
      for (const c of [loss, acc]) {
        c.data[0].push(p.epoch);
        c.series.forEach((name, i) => c.data[i + 1].push(p[name] ?? null));
        c.chart.setData(c.data);
      }
    }
    $("loss-chart").dataset.points = String(loss.data[0].length);
    $("acc-chart").dataset.points = String(acc.data[0].length);
  }

  function showState(status, returnStatus) {
    $("run-status").innerHTML = badge(status);
    $("run-status").dataset.state = status;
    $("cancel-run").hidden = !["queued", "running", "paused"].includes(status);
    const failed = status === "failed" && returnStatus;
    $("failure").hidden = !failed;
    $("traceback").textContent = failed ? returnStatus : "";
  }

  function kv(table, entries) {
    table.tBodies[0].innerHTML = entries.map(([k, v]) =>
      `<tr><td>${esc(k)}</td><td>${fmt(v)}</td></tr>`).join("") ||
      '<tr><td colspan="2" class="sub">none yet</td></tr>';
  }

  api("/api/run", { db, id }).then((run) => {
    $("pipeline").textContent = run.pipeline;
    showState(run.status, run.return_status);
    kv($("params"), Object.entries(run.params).filter(([k]) => k !== "pipeline"));
    kv($("results"), run.results ? Object.entries(run.results) : []);
    $("events").tBodies[0].innerHTML = run.events.map((e) =>
      `<tr><td>${new Date(e.at * 1000).toLocaleString()}</td><td>${esc(e.from || "–")} → ` +
      `${esc(e.to)}</td><td class="sub">${esc(e.detail || "")}</td></tr>`).join("");
    $("log").textContent = run.log || "(no output yet)";
    $("log-path").textContent = run.log_path || "";
    addEpochs(run.history);
    window.mosaic.timing.firstRows = performance.now();
    const source = new EventSource(`/api/run/events?db=${encodeURIComponent(db)}&id=${id}` +
                                   `&after=${lastEpoch}`);
    source.addEventListener("open", () => $("live").classList.add("on"));
    source.addEventListener("error", () => $("live").classList.remove("on"));
    source.addEventListener("epochs", (e) => addEpochs(JSON.parse(e.data)));
    source.addEventListener("state", (e) => {
      const s = JSON.parse(e.data);
      showState(s.status, s.return_status);
      if (!["queued", "running"].includes(s.status)) {
        api("/api/run", { db, id }).then((r) => kv($("results"),
          r.results ? Object.entries(r.results) : []));
      }
    });
    source.addEventListener("log", (e) => {
      const log = $("log");
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.textContent = JSON.parse(e.data).text || "(no output yet)";
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
  }).catch((err) => message(err.message, true));

  $("cancel-run").onclick = () => control("cancel", { db, ids: [id] },
    (r) => (r.cancelled.length ? `run ${id} cancelled` : `run ${id} had already finished`));
}

// -- comparison --------------------------------------------------------------------------------

function initCompare() {
  const db = PARAMS.get("db");
  crumbs([[baseName(db), studyUrl(db)], ["comparison", `/compare?db=${encodeURIComponent(db)}`]]);
  $("title").textContent = `comparison · ${baseName(db)}`;
  let chart = null;

  function options(select, values, current) {
    select.innerHTML = values.map((v) =>
      `<option${v === current ? " selected" : ""}>${esc(v)}</option>`).join("");
  }

  function pointHtml(families, idx, xs) {
    const rows = families.filter((f) => f.show && f.points[idx]).map((f) => {
      const p = f.points[idx];
      const runs = p.run_ids.map((r) => `<a class="run" href="${runUrl(db, r)}">${r}</a>`);
      if (p.n > p.run_ids.length) runs.push(`… ${p.n - p.run_ids.length} more`);
      return `<tr><td><b style="color:${f.color}">${esc(f.name)}</b></td><td class="num">` +
        `${p.n}</td><td class="num">${fmt(p.mean)}</td><td class="num">${fmt(p.min)}</td>` +
        `<td class="num">${fmt(p.max)}</td><td class="num">${fmt(p.std)}</td>` +
        `<td class="runs-of-point">${runs.join(", ")}</td></tr>`;
    });
    if (!rows.length) return '<p class="sub">no shown family has a point here</p>';
    const axis = (window.mosaic.last && window.mosaic.last.size_by) || "nb_params";
    return `<div><b>${esc(axis)} ${fmt(xs[idx])}</b></div><table class="grid"><thead><tr>` +
      "<th>family</th><th>runs</th><th>mean</th><th>min</th><th>max</th><th>std</th>" +
      `<th>run ids</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
  }

  function draw(out) {
    $("meta-chart").innerHTML = "";
    $("skipped").textContent = "";
    if (!out.meta) { message(out.error || "nothing to plot", true); return; }
    message("");
    const meta = out.meta;
    const spread = $("spread").value;
    const xs = [...new Set(Object.values(meta.series).flatMap((ps) => ps.map((p) => p.nb_params)))]
      .sort((a, b) => a - b);
    const families = Object.entries(meta.series).map(([name, ps], i) => {
      const byX = Object.fromEntries(ps.map((p) => [p.nb_params, p]));
      return { name, color: COLORS[i % COLORS.length], show: true,
               points: xs.map((x) => byX[x] || null) };
    });
    const data = [xs, ...families.map((f) => f.points.map((p) => (p ? p.mean : null)))];
    // A resource axis is always logarithmic (its sizes are positive), as metaplot --x draws it.
    const axis = out.size_by || "nb_params";
    const logX = (axis !== "nb_params" && xs.length > 0 && xs[0] > 0) ||
      (xs.length > 1 && xs[0] > 0 && xs[xs.length - 1] / xs[0] > 10);
    const bars = (p) => (spread === "std" ? [p.mean - p.std, p.mean + p.std] : [p.min, p.max]);
    const lows = families.flatMap((f) => f.points.filter(Boolean).map((p) => bars(p)[0]));
    const highs = families.flatMap((f) => f.points.filter(Boolean).map((p) => bars(p)[1]));
    const pad = (Math.max(...highs) - Math.min(...lows)) * 0.05 || 0.05;
    const opts = {
      width: Math.max(480, $("meta-chart").clientWidth - 20), height: 380,
      scales: { x: { time: false, distr: logX ? 3 : 1 },
                y: { range: [Math.min(...lows) - pad, Math.max(...highs) + pad] } },
      axes: [{ label: axis + (logX ? " (log scale)" : "") }, { label: `${meta.criterion}`, size: 70 }],
      cursor: { focus: { prox: 24 } },
      series: [{ label: axis }, ...families.map((f) => ({
        label: f.name, stroke: f.color, width: 1.5, spanGaps: true,
        points: { show: true, size: 8, fill: f.color } }))],
      hooks: {
        draw: [(u) => {
          const ctx = u.ctx;
          ctx.save();
          ctx.lineWidth = devicePixelRatio;
          families.forEach((f, i) => {
            if (!u.series[i + 1].show) return;
            ctx.strokeStyle = f.color;
            f.points.forEach((p, j) => {
              if (!p) return;
              const [lo, hi] = bars(p);
              const x = u.valToPos(xs[j], "x", true);
              const y0 = u.valToPos(lo, "y", true);
              const y1 = u.valToPos(hi, "y", true);
              const cap = 4 * devicePixelRatio;
              ctx.beginPath();
              ctx.moveTo(x, y0); ctx.lineTo(x, y1);
              ctx.moveTo(x - cap, y0); ctx.lineTo(x + cap, y0);
              ctx.moveTo(x - cap, y1); ctx.lineTo(x + cap, y1);
              ctx.stroke();
            });
          });
          ctx.restore();
        }],
        setCursor: [(u) => {
          const idx = u.cursor.idx;
          if (idx === null || idx === undefined) return;
          families.forEach((f, i) => { f.show = u.series[i + 1].show; });
          $("point").innerHTML = pointHtml(families, idx, xs);
          $("point").dataset.idx = String(idx);
        }],
        setSeries: [(u) => { families.forEach((f, i) => { f.show = u.series[i + 1].show; }); }],
      },
    };
    chart = new uPlot(opts, data, $("meta-chart"));
    window.mosaic.charts = { meta: chart, families, xs };
    $("meta-chart").dataset.families = String(families.length);
    const skipped = Object.entries(meta.skipped || {}).map(([why, ids]) => `${ids.length} ${why}`);
    $("skipped").textContent = `${meta.used} run(s) plotted` +
      (skipped.length ? `; left out: ${skipped.join(", ")}` : "");
  }

  function loadPareto(out) {
    api("/api/pareto", { db, dataset_key: out.dataset_key, criterion: out.criterion,
                         size_by: out.size_by }).then((front) => {
      window.mosaic.pareto = front;
      const body = $("pareto-table").querySelector("tbody");
      $("pareto-note").textContent = front.available ? (front.notes || []).join("; ") : front.note;
      if (!front.available) { body.innerHTML = ""; return; }
      const rows = front.points.slice().sort((a, b) => a.cost - b.cost).map((p) => {
        const by = p.dominated_by.map((d) => `${esc(d.family)} ${fmt(d.cost)} (p ${fmt(d.p_adjusted)})`);
        const where = p.on_front ? (p.dominated_by_means ? "yes*" : "yes") : "no";
        return `<tr data-front="${p.on_front}"><td>${esc(p.family)}</td><td class="num">` +
          `${fmt(p.cost)}</td><td class="num">${p.n}</td><td class="num">${fmt(p.mean)} ` +
          `[${fmt(p.ci[0])}, ${fmt(p.ci[1])}]</td><td>${where}</td><td>${by.join(", ")}</td></tr>`;
      });
      body.innerHTML = `<tr><th>family</th><th>${esc(front.cost)}</th><th>n</th>` +
        "<th>mean [95% CI]</th><th>front</th><th>dominated by</th></tr>" + rows.join("");
    }).catch((err) => { $("pareto-note").textContent = err.message; });
  }

  function load() {
    api("/api/compare", { db, dataset_key: $("dataset-key").value,
                          criterion: $("criterion").value,
                          size_by: $("size-by").value || PARAMS.get("size_by") || "" }).then((out) => {
      options($("dataset-key"), out.dataset_keys, out.dataset_key);
      options($("criterion"), out.criteria, out.criterion);
      options($("size-by"), out.sizes, out.size_by);
      window.mosaic.last = out;
      draw(out);
      loadPareto(out);
      window.mosaic.timing.firstRows = performance.now();
    }).catch((err) => message(err.message, true));
  }

  $("dataset-key").onchange = load;
  $("criterion").onchange = load;
  $("size-by").onchange = load;
  $("spread").onchange = () => window.mosaic.last && draw(window.mosaic.last);
  load();
  // VERDICT: the `mosaic compare` table, once mosaic_client/verdict/ exists (see app.py).
  api("/api/verdict", { db }).then((v) => {
    $("verdict-note").textContent = v.available ? "" : v.note;
  }).catch(() => {});
}

({ overview: initOverview, study: initStudy, run: initRun, compare: initCompare })[PAGE]();
