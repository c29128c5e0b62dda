"""Which files a process opens, seen from outside it: Linux inotify, by ctypes.

A deployed site's test proves that a refused task opened none of the site's data files:
an `OpenWatch` on those files collects every open (by any process) from the moment it
is created; `opened()` returns the watched files opened since the last call.
"""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

IN_OPEN, IN_ACCESS = 0x20, 0x01
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (the name follows)


class OpenWatch:
    """Opens of `paths` (regular files) by anyone, from now on."""

    def __init__(self, paths: list[Path]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._paths: dict[int, Path] = {}
        for path in paths:
            wd = self._libc.inotify_add_watch(self._fd, str(path).encode(), IN_OPEN | IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"cannot watch {path}")
            self._paths[wd] = path

    def opened(self) -> list[Path]:
        """The watched files opened or read since the last call (in order, repeats kept)."""
        seen: list[Path] = []
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                seen.append(self._paths[wd])
                offset += _EVENT.size + length

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
