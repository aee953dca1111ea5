"""The ``userllm`` command line. Every user error prints one clear message and exits non-zero.

One module per stage registers its commands on :data:`~userllm.cli.common.app`: :mod:`~userllm.cli.data`,
:mod:`~userllm.cli.encoder`, :mod:`~userllm.cli.tasks`, :mod:`~userllm.cli.serve`, :mod:`~userllm.cli.bench`.
"""

from __future__ import annotations

import functools
import gzip
import os
import sys
import zlib
from typing import Callable

# isort: off
from userllm.cli import data, encoder, tasks, serve, bench  # noqa: F401  (each registers its commands, in pipeline order)

# isort: on
from userllm.cli.bench import bench_app
from userllm.cli.common import CLOSED, OutputClosed, app, err
from userllm.cli.serve import store_app
from userllm.errors import UserError


class Interrupted(UserError):
    exit_code = 130


class OutOfMemory(UserError):
    exit_code = 1


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure: Python's ``MemoryError``, or torch's (CPU allocator, CUDA)."""
    text = str(e)
    return isinstance(e, MemoryError) or (
        isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
    )


def guarded(command: Callable) -> Callable:
    """``command`` with the low-level exceptions that click/typer would turn into a bare ``Aborted.`` (or a
    silent exit) made into one message each. Readers name the file and line themselves (e.g. a truncated gzip
    file); this is the net for whatever escapes them."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(
                "interrupted: outputs are only ever renamed into place, so none is half-written; "
                "`userllm train --resume` and a rerun of `userllm evaluate` continue where they stopped"
            ) from None
        except BrokenPipeError:
            raise OutputClosed(CLOSED) from None
        except EOFError as e:
            raise UserError(f"an input ended before it was complete (EOFError: {e or 'end of file'})") from None
        except (zlib.error, gzip.BadGzipFile) as e:
            raise UserError(f"a compressed input is corrupt ({type(e).__name__}: {e})") from None
        except UnicodeDecodeError as e:
            raise UserError(f"an input is not valid {e.encoding} text at byte {e.start:,} ({e.reason})") from None
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            raise OutOfMemory(
                f"ran out of memory ({str(e).splitlines()[0][:200]}). Nothing is half-written (outputs are only "
                "renamed into place; `userllm train --resume` continues from the last checkpoint). Hold less at "
                "once: leave micro_batch_size unset so that training sizes its micro-batches to the memory, or "
                "set --max-memory-gb (or -s max_memory_gb=...) below what this machine has free"
            ) from None

    return run


for _typer in (app, bench_app, store_app):
    for _info in _typer.registered_commands:
        _info.callback = guarded(_info.callback)


def main() -> None:
    """Console entry point: user errors become one message and a non-zero exit, never a traceback."""
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # a reader that closed the pipe early shows up here, not as Python exits
    except (OutputClosed, BrokenPipeError) as e:
        e = e if isinstance(e, OutputClosed) else OutputClosed(CLOSED)
        try:  # no second error when Python flushes the closed stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is no file (e.g. captured)
            pass
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except UserError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    finally:
        if "torch.distributed" in sys.modules:  # torch stays unimported for commands that need none
            from userllm.distributed import leave_process_group

            leave_process_group()
