"""The run_groups view of a study (mosaicd.storage.store's migrations create it): runs that
differ only by their repetition, with the mean, sd and median of every run_results column."""

from __future__ import annotations

from mosaic_client.contract import RESOURCE_COLUMNS, RESULT_COLUMNS, VALIDATION_COLUMNS

# run_results' columns as each migration that makes the view finds them (a view may not name a
# column the table does not have yet): before issue 26 added the resource figures (migrations 4
# and 5), and before issue 25 added the validation loader's (migration 9).
COLUMNS_BEFORE_RESOURCES = tuple(
    c for c in RESULT_COLUMNS if c not in RESOURCE_COLUMNS + VALIDATION_COLUMNS
)
COLUMNS_BEFORE_VALIDATION = tuple(c for c in RESULT_COLUMNS if c not in VALIDATION_COLUMNS)


def run_groups_view(cols: tuple[str, ...] = RESULT_COLUMNS) -> str:
    """CREATE VIEW run_groups: runs that share every param but the repetition's (seed, and the
    owner who queued it) form one configuration group; one row per group with its dataset key,
    model key (the `{type}_key` params of data_scheme / pipeline_scheme joined with '_', as
    `metaplot` reads them), nb_params, `runs` (all its runs), `n` (done runs with results) and
    mean_, sd_ (sample, two-pass) and median_ of every run_results column over those n.
    group_id numbers the groups by their first run. Needs SQLite >= 3.35 (window functions,
    sqrt); docs/compare.md shows it in use. `cols`: the run_results columns the database
    has when the view is made (a migration makes it again when columns are added)."""

    def q(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    part = "trim(substr(rest, 1, instr(rest, ',') - 1))"
    medians = ",\n".join(
        f"""med{i}(sig, v) AS (SELECT sig, avg(x) FROM (
            SELECT sig, x, row_number() OVER (PARTITION BY sig ORDER BY x) AS rn,
                   count(*) OVER (PARTITION BY sig) AS cnt
            FROM (SELECT sig, {q(c)} AS x FROM member WHERE {q(c)} IS NOT NULL))
          WHERE rn IN ((cnt + 1) / 2, (cnt + 2) / 2) GROUP BY sig)"""
        for i, c in enumerate(cols)
    )
    means = ", ".join(f"avg({q(c)}) AS {q('mean_' + c)}" for c in cols)
    squares = ", ".join(
        f"sum((m.{q(c)} - {q('mean_' + c)}) * (m.{q(c)} - {q('mean_' + c)})) "
        f"/ (count(m.{q(c)}) - 1) AS {q('var_' + c)}"
        for c in cols
    )
    stats = ",\n       ".join(
        f"g.{q('mean_' + c)}, sqrt(s.{q('var_' + c)}) AS {q('sd_' + c)}, "
        f"med{i}.v AS {q('median_' + c)}"
        for i, c in enumerate(cols)
    )
    joins = "\n".join(f"LEFT JOIN med{i} ON med{i}.sig = g.sig" for i in range(len(cols)))
    return f"""CREATE VIEW IF NOT EXISTS run_groups AS
WITH RECURSIVE
signature(run_id, sig) AS (
  SELECT run_id, group_concat(param_name || '=' || quote(param_value), char(31))
  FROM (SELECT run_id, param_name, param_value FROM params
        WHERE param_name NOT IN ('seed', 'process_seed', 'owner', 'owner_uid')
        ORDER BY run_id, param_name)
  GROUP BY run_id),
scheme(run_id, kind, rest, key, parts) AS (
  SELECT run_id, param_name, param_value || ',', '', 0 FROM params
  WHERE param_name IN ('data_scheme', 'pipeline_scheme')
  UNION ALL
  SELECT run_id, kind, substr(rest, instr(rest, ',') + 1),
    CASE WHEN {part} = '' THEN key ELSE
      key || CASE WHEN parts > 0 THEN '_' ELSE '' END || (SELECT p.param_value FROM params p
        WHERE p.run_id = scheme.run_id AND p.param_name = {part} || '_key') END,
    parts + ({part} <> '')
  FROM scheme WHERE rest <> ''),
keyed(run_id, kind, key) AS (
  SELECT run_id, kind, CASE WHEN parts > 0 THEN key END FROM scheme WHERE rest = ''),
member AS (
  SELECT sg.sig, r.run_id, dk.key AS dataset_key, mk.key AS model_key, res.run_id AS result_of,
         {", ".join("res." + q(c) for c in cols)}
  FROM runs r JOIN signature sg ON sg.run_id = r.run_id
  LEFT JOIN keyed dk ON dk.run_id = r.run_id AND dk.kind = 'data_scheme'
  LEFT JOIN keyed mk ON mk.run_id = r.run_id AND mk.kind = 'pipeline_scheme'
  LEFT JOIN run_results res ON res.run_id = r.run_id AND r.status = 'done'),
grp AS (
  SELECT sig, min(run_id) AS first_run, min(dataset_key) AS dataset_key,
         min(model_key) AS model_key, min(nb_params) AS nb_params, count(*) AS runs,
         count(result_of) AS n, {means}
  FROM member GROUP BY sig),
spread AS (
  SELECT m.sig, {squares}
  FROM member m JOIN grp USING (sig) GROUP BY m.sig),
{medians}
SELECT row_number() OVER (ORDER BY g.first_run) AS group_id, g.dataset_key, g.model_key,
       g.nb_params, g.runs, g.n, g.first_run,
       {stats}
FROM grp g JOIN spread s ON s.sig = g.sig
{joins}
ORDER BY g.first_run"""
