"""One error type for bad user input, and the entry-point guard that prints it as one line.

Anything the user can fix (a flag, a file, a row, a field) raises ``UserError`` with a message
that names what is wrong and where: ``data.jsonl:17: field 'output' is missing``. Entry points
run under ``exit_on_user_error`` so such a message becomes one line on stderr and exit code 2,
with no traceback; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from typing import Callable, TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2
_PEER_GRACE_SECONDS = 3.0


class UserError(Exception):
    """Bad input the user can fix; the message is the whole explanation (one line)."""


def describe_value(value: object) -> str:
    """How a message names a value of the wrong type: its type as a data file spells it, and the
    value itself when it is short. ``None`` -> ``null``, ``3`` -> ``int 3``, ``"1.0"`` ->
    ``str '1.0'``, a list -> ``list``."""
    if value is None:
        return "null"
    name = type(value).__name__
    if isinstance(value, (bool, int, float, str)):
        shown = repr(value)
        return f"{name} {shown}" if len(shown) <= 40 else f"{name} {shown[:37]}..."
    return name


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap an entry point: a ``UserError`` prints ``error: <message>`` once and exits 2.

    Under torchrun every rank usually hits the same error at the same moment. Local rank 0
    prints it and exits at once; the other ranks wait a moment first, so that torchrun, seeing
    rank 0 fail, stops them before they repeat the line. A rank that alone hits an error is
    still heard: after the wait it prints too.
    """

    @functools.wraps(main)
    def guarded(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            _close_progress_bars()  # so the message starts on a line of its own
            if os.environ.get("LOCAL_RANK", "0") != "0":
                time.sleep(_PEER_GRACE_SECONDS)
            print(f"error: {err}", file=sys.stderr, flush=True)
            # os._exit skips atexit hooks of torch.distributed / DeepSpeed that can hang
            # waiting for peers that already died.
            _run_exit_hooks()
            sys.stdout.flush()
            os._exit(USER_ERROR_EXIT_CODE)

    return guarded


def _close_progress_bars() -> None:
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


_EXIT_HOOKS: list[Callable[[], None]] = []


def at_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` when the program ends through ``run_program`` or a UserError (which leave
    with ``os._exit``, skipping ``atexit``): for resources outside the process, such as shared
    memory segments."""
    _EXIT_HOOKS.append(hook)


def _run_exit_hooks() -> None:
    for hook in _EXIT_HOOKS:
        try:
            hook()
        except Exception:  # a failed clean-up must not change how the job ends
            pass


def run_program(main: Callable[[], object]) -> None:
    """Run a trainer as a command: ``main()``, flush, and leave with status 0.

    The process exits directly instead of tearing the interpreter down: with every output
    already written and flushed, the teardown only destroys DeepSpeed/gloo background threads,
    which can abort a finished job (seen: "terminate called without an active exception" after
    a ZeRO-3 export). ``main()`` itself returns normally for in-process callers (submitit).
    """
    main()
    _run_exit_hooks()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
