"""Several processes: the process group (``group``) and data parallelism over replicas (``replicas``).

See docs/distributed.md for the launch commands and the data and loss rules.
"""

from qlorakit.parallel.group import SINGLE, Dist, current, init_from_env, launched, shutdown
from qlorakit.parallel.replicas import Replicas, run_fingerprint

__all__ = ["SINGLE", "Dist", "Replicas", "current", "init_from_env", "launched", "run_fingerprint", "shutdown"]
