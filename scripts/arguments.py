"""Command-line checks the scripts share, so that a bad flag fails in one argparse line before any
model is built or run starts: argparse types for counts and seeds, and whether an output can be
written (a path found unwritable after the runs would throw them away)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

#: Seeds go to numpy too (``lightning.seed_everything``), which takes only ``0 <= seed < 2**32``.
SEED_LIMIT = 2**32


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count of steps, threads, a batch size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seed(text: str) -> int:
    """argparse type: a random seed, ``0 <= seed < 2**32``."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {SEED_LIMIT - 1}, got {text!r}")
    return value


def output_problem(flag: str, path: Union[str, Path], folder: bool = False) -> Optional[str]:
    """What stops ``path`` (given as ``flag``) from being written, or None: a file to write (not a
    folder, and a writable file where it exists) or, with ``folder``, a folder to write into. A missing
    path is not made: the nearest folder above it that exists must be one that can be written, which
    is tried by making an unnamed temporary file there (``os.access`` says yes to root even in /proc)."""
    path = Path(path)
    said = f"{flag} {path}"
    if path.is_dir():
        if not folder:
            return f"{said}: is a folder; it names a file to write"
        return None if _writable(path) else f"{said}: not a writable folder"
    if path.exists() and folder:
        return f"{said}: is a file; it names a folder to write into"
    if path.is_file():  # not a device or a pipe, which opening could block on
        try:
            open(path, "ab").close()  # appends nothing: the file is left as it is
        except OSError as error:
            return f"{said}: cannot be written ({error.strerror})"
        return None  # written in place: its folder need not be writable
    if path.exists():  # a device such as /dev/stdout
        return None if os.access(path, os.W_OK) else f"{said}: cannot be written"
    above = next(parent for parent in path.absolute().parents if parent.exists())
    what = "the folder" if folder else "the file"
    if not above.is_dir():
        return f"{said}: {above} is a file, so {what} cannot be made there"
    if not _writable(above):
        return f"{said}: {above} is not a writable folder, so {what} cannot be made there"
    return None


def refuse_unwritable(parser: argparse.ArgumentParser, *outputs: tuple[str, Optional[Union[str, Path]]],
                      folder: bool = False) -> None:
    """``parser.error`` (one line, exit status 2) on the first ``(flag, path)`` of ``outputs`` that
    cannot be written (:func:`output_problem`); a ``None`` path is an output not asked for."""
    for flag, path in outputs:
        if path is not None and (problem := output_problem(flag, path, folder)):
            parser.error(problem)


def _writable(folder: Path) -> bool:
    """Whether a file can be made in ``folder``, found by making one that vanishes when closed."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
