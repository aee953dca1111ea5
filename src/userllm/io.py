"""Nothing is lost: outputs are written to a temporary path beside the target and renamed into place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from userllm.errors import InputError, OutputExistsError


def check_output(out: Path, force: bool, marker: str = "manifest.json") -> None:
    """Refuse to replace an existing ``out`` unless ``force``; never replace a directory that is not ours
    (one that is non-empty and has no ``marker`` file)."""
    if not out.exists():
        return
    if not force:
        raise OutputExistsError(f"output {out} already exists; pass --force to replace it")
    if out.is_file() or (any(out.iterdir()) and not (out / marker).exists()):
        raise OutputExistsError(
            f"output {out} exists and is not a userllm output (it has no {marker}); refusing to replace it"
        )


def write_dir_atomically(
    out: Path, write: Callable[[Path], None], *, force: bool, marker: str = "manifest.json"
) -> None:
    """Call ``write(tmp_dir)`` on a temporary directory beside ``out``, then rename it into place.

    An interrupted run leaves nothing at ``out`` (or the previous version); leftovers of killed runs are
    cleaned on the next call.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        check_output(out, force, marker)
        if out.exists():
            old = out.parent / f".{out.name}.tmp-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path`` (same directory, so the rename is atomic), then
    ``os.replace`` it into place: a reader sees the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write a text file through :func:`write_file_atomically`."""
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data: object) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def state_hash(model) -> str:
    """sha256 over every parameter and buffer of a torch module (name, then bytes), in state-dict order."""
    import torch

    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def start_run(
    out: Path, *, resume: bool, force: bool, rank: int, marker: str, checkpoint: str = "checkpoint", empty: bool = True
) -> None:
    """Check a training run directory before starting: an existing run needs ``resume`` (continue its
    ``checkpoint``) or ``force`` (start over: rank 0 empties it, refusing directories that are not ours;
    ``empty=False``: only the checks, the emptying left to a later call)."""
    if out.exists() and any(out.iterdir()) and not (resume or force):
        raise OutputExistsError(
            f"run directory {out} already exists; pass --resume to continue it or --force to replace it"
        )
    if resume and not (out / checkpoint / "train_state.pt").exists():
        raise InputError(f"--resume: no checkpoint in {out} to continue from")
    if empty and force and not resume and rank == 0 and out.exists():
        write_dir_atomically(out, lambda tmp: None, force=True, marker=marker)


def source_commit() -> str | None:
    """The git commit of the userllm source that is running (``+dirty`` with uncommitted changes), or None
    outside a git checkout (e.g. an installed wheel)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


def runtime() -> dict:
    """Where a run computed, beside its ``summary.json``: the source commit, torch, the CPU kernels torch
    dispatches to (``AVX512``, ``AVX2``, ...), its threads and the GPU if any. Training is seeded end to end, so
    one machine reproduces a run bit for bit; a machine with other kernels may round differently, and its run
    may drift from there (``tests/encoder/test_train.py``: identical across processes and hash seeds)."""
    import torch

    return {
        "commit": source_commit(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
