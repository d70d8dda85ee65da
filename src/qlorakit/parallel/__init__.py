"""Several processes: the process group (``group``), data parallelism over replicas (``replicas``) and the
choice of strategy (``strategy``).

See docs/distributed.md for the launch commands and the data and loss rules.
"""

from qlorakit.parallel.group import SINGLE, Dist, current, init_from_env, launched, process_group, shutdown
from qlorakit.parallel.replicas import Replicas, run_fingerprint
from qlorakit.parallel.strategy import choose_strategy

__all__ = ["SINGLE", "Dist", "Replicas", "choose_strategy", "current", "init_from_env", "launched", "process_group",
           "run_fingerprint", "shutdown"]
