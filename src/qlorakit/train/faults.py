"""The fault-injection hook of the tests: pause at a named point so that a test can kill the process there.

``QLORAKIT_FAULT_PAUSE=<point>@<where>`` (``@<where>`` optional) makes ``pause_point(point, where)`` print
``qlorakit-fault: paused at <point>@<where> pid <pid>`` on stderr and sleep ``QLORAKIT_FAULT_PAUSE_S`` seconds
(default 3600; signals are handled meanwhile). Points: ``fileio.WRITE_POINTS`` inside every checkpoint and
final-adapter write (``where`` = ``checkpoint-<step>`` or ``adapter``) and ``before-optimizer-step``
(``where`` = ``step-<n>``, the step being taken). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "QLORAKIT_FAULT_PAUSE"


def pause_point(point: str, where: str) -> None:
    """Pause here when ``QLORAKIT_FAULT_PAUSE`` names this point (and this ``where``, if it names one)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name != point or (at and at != where):
        return
    print(f"qlorakit-fault: paused at {point}@{where} pid {os.getpid()}", file=sys.stderr, flush=True)
    time.sleep(float(os.environ.get(ENV + "_S", "3600")))
