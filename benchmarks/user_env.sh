#!/usr/bin/env bash
# A virtualenv like a user's, for the benchmarks that measure memory: the README's install of qlorakit
# (`pip install torch==2.13.0 && pip install -e .`, no extras) plus the peer stack at the versions the test
# extra pins (bitsandbytes, peft; peft brings accelerate). Nothing else: the test extra also installs triton
# and scipy, which torch and transformers import whenever they are present (torch._dynamo probes triton,
# transformers' losses import scipy), and which add about 107 MiB resident to BOTH stacks' processes
# (docs/benchmarks.md). Neither a qlorakit user on a CPU nor a user of the peer stack has them.
#
#     bash benchmarks/user_env.sh [VENV]        (default: /tmp/qlorakit-user-venv)
#     OMP_NUM_THREADS=1 VENV/bin/python benchmarks/train_throughput.py ...
#
# The benchmark children run with the driver's interpreter, so running the driver from VENV is enough.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${1:-/tmp/qlorakit-user-venv}"

# The peer's pins, from the one place they are written (pyproject.toml's test extra).
PEER=$(grep -oE '"(bitsandbytes|peft)==[^"]+"' pyproject.toml | tr -d '"' | tr '\n' ' ')
[ -n "$PEER" ] || { echo "user_env.sh: no bitsandbytes/peft pins found in pyproject.toml" >&2; exit 1; }

python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip install -q torch==2.13.0
pip install -q -e .
# shellcheck disable=SC2086
pip install -q $PEER
python - <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
from _harness import IMPORTED_IF_PRESENT, extras_present  # the one list of them
extra = extras_present()
print("user env ready:", "also has " + ", ".join(extra) if extra else "none of " + ", ".join(IMPORTED_IF_PRESENT))
EOF
