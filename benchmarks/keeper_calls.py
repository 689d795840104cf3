"""What a keeper process costs per call (issue 24): the same study operations through the
daemon's in-process keeper (a daemon serving its own user) and through a keeper process (a
shared daemon: one per user, over a socket pair), measured in this one invocation.

    .venv/bin/python benchmarks/keeper_calls.py --calls 2000

Prints per-call microseconds for a read (status_of), a write (record_epochs of one epoch, one
transaction) and the ratio process/in-process. A run makes about a dozen such calls (start,
provenance, one write per second of epochs, finish), so the per-run cost is that dozen times
the difference.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
import tempfile
import time

from mosaicd.executors.local import owner_environment
from mosaicd.keeper.link import Keepers, Link, ProcessLink
from mosaicd.owners import Owner
from mosaicd.storage.store import Store


def _study(path: str) -> None:
    store = Store(path, create=True)
    modules = [{"type": "mlp", "class": "m", "path_to_class": "/x"}]
    store.add_submission(os.getuid(), "me", "c.ini", {"epochs": 10**6}, {}, [(modules, 0, "m", {})])
    store.close()


def _time(link: Link, study: str, calls: int) -> tuple[float, float]:
    link.open(study, create=False, umask=None)
    started = time.perf_counter()
    for _ in range(calls):
        link.call("status_of", study, {"run_id": 1})
    read = (time.perf_counter() - started) / calls
    started = time.perf_counter()
    for epoch in range(1, calls + 1):
        event = {"run_id": 1, "epoch": epoch, "train_loss": 0.5, "test_loss": 0.5, "duration": 0.1}
        link.call("record_epochs", study, {"events": [event]})
    write = (time.perf_counter() - started) / calls
    return read, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    me = pwd.getpwuid(os.getuid())
    owner = Owner(me.pw_uid, me.pw_gid, (me.pw_gid,), me.pw_name, me.pw_dir)
    with tempfile.TemporaryDirectory(prefix="mosaic-keeper-bench-") as where:
        local, remote = os.path.join(where, "a.db"), os.path.join(where, "b.db")
        _study(local)
        _study(remote)
        keepers = Keepers()
        try:
            in_process = _time(keepers.of(None), local, args.calls)
            # A keeper process of this same user: the socket pair and the process, no switch.
            link = ProcessLink(owner, sys.executable, owner_environment(owner))
            try:
                process = _time(link, remote, args.calls)
            finally:
                link.stop()
        finally:
            keepers.stop_all()
    print(f"{'operation':<14}{'in-process µs':>15}{'keeper process µs':>19}{'ratio':>8}")
    for name, a, b in (
        ("status_of", in_process[0], process[0]),
        ("record_epochs", in_process[1], process[1]),
    ):
        print(f"{name:<14}{a * 1e6:>15.1f}{b * 1e6:>19.1f}{b / a:>8.2f}")


if __name__ == "__main__":
    main()
