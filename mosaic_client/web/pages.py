"""The HTML of each page: a small shell; static/app.js fills it from the JSON API and the
server-sent events. Every value put into the HTML here is escaped."""

from __future__ import annotations

from html import escape

PAGES = ("overview", "study", "run", "compare")

_BODIES = {
    "overview": """
<section class="bar">
  <div id="daemon" class="daemon">connecting to the daemon…</div>
  <div class="controls">
    <button id="pause" title="start no new run (mosaic pause)">Pause</button>
    <button id="pause-now" title="also park running runs at their next epoch boundary
(mosaic pause --now)">Pause now</button>
    <button id="resume" title="start runs again (mosaic resume)">Resume</button>
  </div>
</section>
<p id="message" class="message" role="status"></p>
<h2>Workers</h2>
<table id="workers" class="grid"><thead><tr><th>worker</th><th>slot</th><th>state</th>
<th>pid</th><th>run</th><th class="num">CPU %</th><th class="num">RAM</th><th class="num">GPU</th>
<th class="num">runs done</th></tr></thead><tbody></tbody></table>
<h2>Studies</h2>
<table id="studies" class="grid"><thead><tr><th>study</th><th>runs</th><th>running</th>
<th></th></tr></thead><tbody></tbody></table>
""",
    "study": """
<section class="bar"><div><h1 id="title"></h1><div id="counts" class="counts"></div></div>
<div class="controls"><a id="compare-link" class="button">Compare</a>
<button id="cancel-selected" disabled>Cancel selected</button></div></section>
<p id="message" class="message" role="status"></p>
<ul id="searches" class="searches"></ul>
<section class="filters">
  <div id="states" class="states"></div>
  <div id="keys" class="keys"></div>
  <form id="param-form"><input id="param-filter" placeholder="param filter, e.g. lr<=0.01"
   size="28" aria-label="param filter"><button>Add filter</button></form>
  <div id="chips" class="chips"></div>
</section>
<table id="runs" class="grid runs"><thead></thead><tbody></tbody></table>
<section class="pager"><button id="prev">‹ prev</button><span id="range"></span>
<button id="next">next ›</button>
<label>rows <select id="page-size"><option>25</option><option selected>50</option>
<option>100</option><option>250</option></select></label></section>
""",
    "run": """
<section class="bar"><div><h1 id="title"></h1><div id="pipeline" class="sub"></div></div>
<div class="controls"><button id="cancel-run" hidden>Cancel run</button></div></section>
<p id="message" class="message" role="status"></p>
<section id="failure" hidden><h2>Traceback</h2><pre id="traceback" class="traceback"></pre>
</section>
<div class="charts">
  <figure><figcaption>loss per epoch</figcaption><div id="loss-chart" class="chart"></div>
  </figure>
  <figure><figcaption>accuracy per epoch</figcaption><div id="acc-chart" class="chart"></div>
  </figure>
</div>
<div class="columns">
  <section><h2>Parameters</h2><table id="params" class="grid kv"><tbody></tbody></table>
  </section>
  <section><h2>Results</h2><table id="results" class="grid kv"><tbody></tbody></table>
  <h2>History</h2><table id="events" class="grid"><tbody></tbody></table></section>
</div>
<h2>Log <span id="log-path" class="sub"></span></h2><pre id="log" class="log"></pre>
""",
    "compare": """
<section class="bar"><div><h1 id="title"></h1><div class="sub">mean of each model key
(family) per number of parameters (or another size axis: FLOPs, latency, memory…, log scale);
bars span the runs' min–max (or ± std); hover a point
for its runs, click a family in the legend to hide or show it</div></div></section>
<form id="compare-form" class="filters">
  <label>dataset key <select id="dataset-key"></select></label>
  <label>criterion <select id="criterion"></select></label>
  <label>size axis <select id="size-by"></select></label>
  <label>bars <select id="spread"><option value="minmax">min–max</option>
  <option value="std">± std</option></select></label>
</form>
<p id="message" class="message" role="status"></p>
<div id="meta-chart" class="chart wide"></div>
<section id="point" class="point"><p class="sub">hover a point to see its runs</p></section>
<p id="skipped" class="sub"></p>
<!-- VERDICT: the table of `mosaic compare` (mosaic_client/verdict/, issue 14's compare work)
     goes here once that module exists; the server's /api/verdict says whether it is there. -->
<section id="pareto" class="verdict"><h2>Pareto front</h2><p class="sub">the criterion against
the size axis: a point is off the front only when compare's test (Holm) finds a point costing
no more better; yes* = on the front, a cheaper point's better mean not decided</p>
<table id="pareto-table" class="grid"><tbody></tbody></table><p class="sub" id="pareto-note"></p>
</section>
<section id="verdict" class="verdict"><h2>Verdict</h2><p class="sub" id="verdict-note"></p>
</section>
""",
}


def render(page: str, token: str, title: str, charts: bool = False) -> str:
    head = (
        '<link rel="stylesheet" href="/static/uPlot.min.css">'
        '<script src="/static/uPlot.iife.min.js"></script>'
        if charts
        else ""
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="mosaic-token" content="{escape(token)}">
<title>{escape(title)} · Mosaic</title>
<link rel="stylesheet" href="/static/app.css">{head}
<script src="/static/app.js" defer></script>
</head><body data-page="{escape(page)}">
<nav><a href="/" class="brand">Mosaic</a><a href="/">overview</a>
<span id="crumbs"></span><span id="live" class="live" title="live updates">●</span></nav>
<main>{_BODIES[page]}</main></body></html>"""
