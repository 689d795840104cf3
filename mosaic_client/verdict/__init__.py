"""The statistics behind `mosaic compare` and `metaplot --ci`, in four modules, each importing
only those before it:

* reading.py: what a study holds for a verdict (study_values: the metric of every finished run,
  as Sides), which way each metric is better, VerdictError;
* statistics.py: pure functions over numbers: the tests, the bootstrap CIs (mean_ci for
  metaplot --ci), Holm, power and the repetitions needed;
* comparison.py: one report (compare): sizes matched, lines tested, Holm, the verdict words;
* sequential.py: the sequential plan of `compare --until-decided` (alpha spent over the looks).

Import the module you need. Nothing is imported here: the package is loaded only by the
commands that need it (numpy and scipy are slow to import; `mosaic status` must stay fast).
docs/compare.md gives the procedure, the formulas and the references; the choices in short:

* one comparison *line* = one size of family A against the nearest size of family B (within a
  factor), or the whole curves of A and B over their overlapping nb_params range;
* paired by repetition when both sides ran the same seeds on the same data stage, else unpaired;
* the test: an exact sign-flip permutation test of the mean difference (paired), Welch's t test
  (unpaired), a Welch-Satterthwaite t test of a linear contrast (curves);
* the verdict: Holm-adjusted p-value <= alpha across every tested line of one report; the
  bootstrap confidence intervals (percentile, 10,000 resamples, fixed seed) are descriptive;
* lines that can never reach alpha (too few repetitions) are left out of the Holm family
  (Tarone 1990: a hypothesis that cannot be rejected does not count towards the error rate).
"""
