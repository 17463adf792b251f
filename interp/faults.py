"""Test-only fault injection: crash or pause a process at a named point, deterministically.

Crash-safety tests set ``INTERP_FAULT`` in a child process instead of killing it after a sleep:
- ``INTERP_FAULT="<point>#<n>"`` sends SIGKILL to the process the n-th time it reaches ``<point>``;
- ``INTERP_FAULT="<point>#<n>#hold:<file>"`` writes the pid into ``<file>`` there and waits until
  the test deletes the file (to check what other processes see meanwhile).
- ``INTERP_FAULT_RANK=<r>`` limits either to the process whose torchrun ``RANK`` is ``r`` (the
  other ranks of a distributed job run on).
Without the variable (always, outside tests) a point costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_reached: dict[str, int] = {}


def fault_point(name: str) -> None:
    spec = os.environ.get("INTERP_FAULT")
    if not spec:
        return
    point, count, *action = spec.split("#", 2)
    if point != name or os.environ.get("INTERP_FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(count):
        return
    if not action:
        os.kill(os.getpid(), signal.SIGKILL)
    kind, _, target = action[0].partition(":")
    if kind != "hold" or not target:
        raise ValueError(f"INTERP_FAULT={spec!r}: the action must be empty (kill) or hold:<file>")
    flag = Path(target)
    flag.write_text(str(os.getpid()))
    while flag.exists():
        time.sleep(0.01)
