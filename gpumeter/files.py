"""Files gpumeter writes: whole (atomic replace) and private to their owner."""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077  # files 0600, directories 0700: usage, keys and money are nobody else's business


def check_owner_only(st_mode: int, what: str, path: Path, group_read: bool = False) -> int:
    """ConfigError unless the file is readable and writable by its owner only (0600 or stricter;
    with ``group_read`` its group may read it too): key files, the keys registry, password files.
    ``what`` names the file in the message (``"signing key /etc/..."``). Its permission bits."""
    from gpumeter.errors import ConfigError

    mode = stat.S_IMODE(st_mode)
    allowed = stat.S_IRGRP if group_read else 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO) & ~allowed:
        raise ConfigError(f"{what} is open to other users (mode {mode:04o}); chmod 600 {path}")
    return mode


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, sync: bool, mode: int = 0o600, group: int = -1) -> None:
    """Replace ``path`` whole: a reader sees the old or the new bytes, never a mix; the new file has
    ``mode`` (and ``group``, unless -1) whatever the umask, and never exists with a looser one. The
    temporary file beside it is made new (a link planted in its place is not followed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a crash
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        if group != -1:
            os.fchown(fd, -1, group)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)
