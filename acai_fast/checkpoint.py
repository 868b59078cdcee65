"""Checkpoint files: written atomically, read as data (never as code), refused with one clear line.

A checkpoint is one `torch.save` file holding only tensors, dicts, lists, tuples, ints, floats,
bools, None and strings (a torch.Generator's state is a ByteTensor), so it loads with
`torch.load(weights_only=True)`: a crafted file cannot run code here. Writing goes to a temporary
file beside the target, is fsync'ed, then renamed over the target (and the folder fsync'ed): at
every instant the target is either the previous complete checkpoint or the new complete one, so a
crash, a SIGKILL or a full disk during a write never costs the last good checkpoint.

What a state holds is the trainer's business (`ACAITrainer.state_dict`); this module only writes,
reads and vets the file (format version, the keys every state has).
"""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

# 2: the first format (acai_fast <= 0.1.0 before this module); 3: adds package_version, world_size
# and the random streams of every rank of a distributed run (rank_states). Both read the same way.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
REQUIRED_KEYS = ("version", "model_name", "config", "seed", "nimg", "steps", "model", "probe",
                 "optimizer", "generator", "generator_device", "alpha_state")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's (default) zip container


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or must not be read; str() is one line for the user."""


def temporary_path(path: str | os.PathLike) -> Path:
    """Where `save_checkpoint` writes before renaming: `<name>.tmp` beside `path` (a leftover from a
    killed write is overwritten by the next save and never read)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write `state` to `path` atomically: temporary file, flush + fsync, rename over `path`, fsync
    of the folder. On any failure (a full disk, an unwritable folder) the temporary file is removed,
    the previous checkpoint at `path` is left as it was, and CheckpointError says so in one line."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # RuntimeError: how torch's zip writer reports a failed write
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # (the folder itself may be what failed)
            pass
        kept = f"; the previous checkpoint {path} is intact" if path.is_file() else ""
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc):
            reason = "the disk is full"
        elif isinstance(exc, RuntimeError):  # torch's writer does not say why: usually a full disk
            reason = f"the write failed, is the disk full? ({_first_line(exc)})"
        else:
            reason = exc.strerror or _first_line(exc)
        raise CheckpointError(f"could not write checkpoint {path}: {reason}{kept}") from None
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX: a directory entry is data of the folder). Best effort: some
    file systems and platforms cannot open a folder for fsync."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state saved at `path`, read with torch.load(weights_only=True) onto the CPU.

    FileNotFoundError when there is no file; CheckpointError (a ValueError, one line) when the file
    is empty, truncated or corrupted, not a PyTorch file, holds Python objects other than plain data
    (a crafted pickle: nothing in it runs), is another program's file, or has a format version this
    acai_fast does not read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path} is empty (an interrupted copy or write?); not a checkpoint")
    if head != _ZIP_MAGIC:
        # torch.save has written zip archives since PyTorch 1.6 and acai_fast writes nothing else;
        # anything else (a bare pickle, text, random bytes) is refused before any unpickling.
        raise CheckpointError(f"{path} is not an acai_fast checkpoint ({_not_zip(head)})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_message(path, exc)) from None
    except Exception as exc:  # the zip reader's RuntimeError, EOFError, ...: a damaged archive
        raise CheckpointError(f"{path} is truncated or corrupted ({_first_line(exc)}); "
                              f"not a complete checkpoint") from None
    check_state(state, path)
    return state


def check_state(state, path: str | os.PathLike = "checkpoint") -> None:
    """Raise CheckpointError unless `state` looks like an acai_fast checkpoint this version reads."""
    if not isinstance(state, dict) or "model_name" not in state or "version" not in state:
        raise CheckpointError(f"{path} is not an acai_fast checkpoint (a PyTorch file holding "
                              f"{_describe(state)})")
    version = state["version"]
    if version not in READABLE_VERSIONS:
        written_by = state.get("package_version")
        by = f" by acai_fast {written_by}" if isinstance(written_by, str) else ""
        raise CheckpointError(f"{path} has checkpoint format version {version!r} (written{by}); this "
                              f"acai_fast ({package_version()}) reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a complete acai_fast checkpoint (missing {', '.join(missing)})")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"{path}: its config is {type(state['config']).__name__}, not a dict")


def check_output_folder(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """Fail early, before any training, if `folder` cannot take the run's outputs: it cannot be
    created, a file cannot be written, fsync'ed and removed there, or the disk has less than
    `need_bytes` free. Raises CheckpointError (one line)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"output folder {folder} cannot be created: {exc.strerror or exc}") from None
    probe = folder / f".acai_fast_write_test.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(f"output folder {folder} is not writable: {reason}") from None
    finally:
        probe.unlink(missing_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise CheckpointError(f"output folder {folder}: {_mib(free)} free on its disk, the run's checkpoints "
                              f"need about {_mib(need_bytes)} (the old one is kept until the new one is "
                              f"written); free some space or choose another --out")


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail early, before any work, if the file `path` cannot be written: its folder is missing (a
    typo must not cost an hour of work, nor silently create folders), is not a folder or is not
    writable (a file is created, fsync'ed and removed there), or `path` is a folder. Raises
    CheckpointError (one line); returns the path. An existing file is overwritten later."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a file name")
    if not folder.exists():
        raise CheckpointError(f"{path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"{path}: {folder} is not a folder")
    probe = folder / f".acai_fast_write_test.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
            os.fsync(f.fileno())
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(f"{path}: the folder {folder} is not writable ({reason})") from None
    finally:
        probe.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------------


def _unpickling_message(path: Path, exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", text)
    if found:  # the pickle asks for a Python callable or class: code, not data
        return (f"{path} holds Python objects other than tensors and plain data ({found.group(1)}); "
                f"refused (checkpoints are read as data with torch.load(weights_only=True): nothing in "
                f"it ran)")
    bad_op = re.search(r"Unsupported operand \S+", text)
    reason = bad_op.group(0) if bad_op else _first_line(exc)
    return f"{path} is truncated or corrupted ({reason}); not a complete checkpoint"


def _not_zip(head: bytes) -> str:
    if head[:1] == b"\x80":
        return "a bare Python pickle, not a torch.save archive; pickles can run code and are not read"
    if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"a text file starting {head.decode('ascii')!r}"
    return f"not a torch.save archive: it starts with bytes {head.hex(' ')}"


def _first_line(exc: Exception) -> str:
    """The first sentence of an exception's message (torch's can run to a paragraph)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 160 else text[:157] + "..."


def _describe(obj) -> str:
    if isinstance(obj, dict):
        keys = [str(k) for k in list(obj)[:5]]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(obj) > 5 else ''}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB"


def package_version() -> str:
    """The installed acai_fast's version (its package metadata: no import from the package root,
    which sits above this module), or "unknown" when running from an uninstalled source tree."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("acai_fast")
    except PackageNotFoundError:
        return "unknown"
