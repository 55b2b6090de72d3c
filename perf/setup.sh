#!/usr/bin/env bash
# The benchmarks' own environment: TRL (the peer we compare with) goes into perf/.venv-trl, a venv
# that sees the main environment's packages, so TRL runs on the very same torch / transformers /
# datasets, and the project's environment never gets TRL.
#   bash perf/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TRL_VERSION="${TRL_VERSION:-1.16.0}"
if [ ! -x perf/.venv-trl/bin/python ]; then
  python -m venv --system-site-packages perf/.venv-trl
fi
# Pin what is already installed so TRL's requirements cannot swap torch or transformers.
constraints="$(mktemp)"
python - > "$constraints" <<'PY'
import importlib.metadata as m
for name in ("torch", "transformers", "accelerate", "datasets", "numpy"):
    try:
        print(f"{name}=={m.version(name)}")
    except m.PackageNotFoundError:
        pass
PY
perf/.venv-trl/bin/pip install -q -c "$constraints" "trl==${TRL_VERSION}" matplotlib
rm -f "$constraints"
perf/.venv-trl/bin/python -c "import trl, torch, transformers; print('perf/.venv-trl: trl', trl.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
