"""How a process that ran collectives ends: without interpreter finalisation, if it tore down a
process group. Torch-free, so the ``pipeline`` entry point can import it for every command."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

_PROCESS_GROUP_CLOSED = False  # set once an engine has torn down a process group in this process


def mark_process_group_closed() -> None:
    """Called by ``Engine.close`` before it destroys the process group."""
    global _PROCESS_GROUP_CLOSED
    _PROCESS_GROUP_CLOSED = True


def exit_process(code: int) -> NoReturn:
    """Leave a process that ran collectives without interpreter finalisation, if it did.

    ``destroy_process_group`` drops torch's own references to the process groups, but FSDP's
    device mesh, DeepSpeed's communication groups and Accelerate's state keep others, so the
    C++ gloo objects are destroyed only during interpreter finalisation, where their threads
    abort the process ("terminate called without an active exception", SIGABRT) after all
    work is done: seen here on about 1 in 10 two-process runs (torch 2.13, gloo; the same
    mechanism as pytorch/pytorch#179291). By then every file the run writes is closed and
    fsynced (checkpoints, tracker), so the process ends with os._exit and its real exit code.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if not _PROCESS_GROUP_CLOSED:
        sys.exit(code)
    logging.shutdown()
    os._exit(code)
