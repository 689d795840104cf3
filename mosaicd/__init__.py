"""mosaicd: the Mosaic daemon. Its parts, one subpackage each:

- ``service/``: the daemon's process (root on a shared box): the loop, the sockets, who a client
  is (``rights``), the request handlers and their one dispatch table.
- ``scheduling/``: where the next run is chosen: the queue, holds, dispatch to idle workers,
  what worker events mean, control (pause, cancel, rerun, rekey), repetitions, the replies that
  describe the daemon's state.
- ``storage/``: where a study is written: the study database (its schema and the one door for a
  run's state), the per-study writer, the registry of open studies, the daemon's own state.
- ``executors/``: what starts and talks to workers: the interface, the local pool, Ray.
- ``training/``: the worker process (runs as the run's owner, imports torch): where a run
  trains, alone or in an ensemble, with its provenance, metrics and log.

Beside them: ``main`` (the ``mosaicd`` command), ``options`` (its options), ``owners`` (whom a
run executes as), ``errors`` (the one refusal exception).
"""
