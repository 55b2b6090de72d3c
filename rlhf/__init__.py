"""rlhf: post-training for Hugging Face causal LMs as one SPMD torch.distributed program.

Importing the package silences two start-up lines of third-party libraries that say nothing a
user of rlhf can act on: DeepSpeed's "Setting accelerator to CPU ..." (rlhf picks the device
itself: CUDA when present, else CPU) and bitsandbytes' "Failed to load CPU gemm_4bit_forward
from kernels-community" (an optional faster CPU kernel for 4-bit layers). Only those messages
are dropped; every other record of those loggers passes. Nothing heavy is imported here.
"""

from __future__ import annotations

import logging

_QUIET = {
    "DeepSpeed": "Setting accelerator to CPU",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
}


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


for _name, _start in _QUIET.items():
    logging.getLogger(_name).addFilter(_DropMessage(_start))
