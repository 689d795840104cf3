"""The statistics behind `mosaic compare` and `metaplot --ci`, in six modules, each importing
only those before it:

* reading.py: what a study holds for a verdict (study_values: the metric of every finished run,
  and the failed runs, as Sides), which way each metric is better, VerdictError;
* statistics.py: pure functions over numbers: the t tests and their intervals, exact tests for
  data without spread, TOST, Fisher's test, score intervals, the step-down correction (Holm with
  Tarone's screen), power and the repetitions needed, the t interval of mean_ci (metaplot --ci);
* lines.py: one line's numbers: pairing by seed, P(A better), line_statistics;
* comparison.py: one report (compare): sizes matched, lines tested, the correction, the words;
* sequential.py: the group-sequential plan of `compare --until-decided`;
* recorded.py: the plans kept in the study (record_plan) and the level a later compare of
  their lines has left.

Import the module you need. Nothing is imported here: the package is loaded only by the
commands that need it (numpy and scipy are slow to import; `mosaic status` must stay fast).
docs/compare.md gives the procedure, the formulas, the simulated error rates and the
references; the choices in short:

* one comparison *line* = one size of family A against one size of family B (matched one to
  one, closest first, within a factor), or the whole curves of A and B over their overlap;
* paired by seed over the complete pairs, else unpaired;
* the test: the paired t test, Welch's t test, a Welch-Satterthwaite t test of a linear contrast
  (curves); an exact permutation test when the data have no spread; never p = 0 by rule;
* failures (failed runs, NaN metrics) are outcomes: Fisher's exact test per line, and P(A
  better) counts a failed run as a loss;
* the verdict: every mean, failure and equivalence (--margin, TOST) test of a report in one
  Holm step-down, after Tarone's screen (a test whose smallest p cannot reach its level leaves
  the family: "too few repetitions").
"""
