"""Empty files made ahead of time in C{tmp/}, so that a commit does not wait
for the file system to allocate one.

Creating a file is the slowest of the calls a commit makes after the
fsync: the file system allocates an inode and adds a directory entry,
under locks that every other creation in the directory shares (measured in
C{bench/RESULTS.md}: about a third of a millisecond per file at the median
under load, and more at the tail).  L{SpareFiles} keeps some created and
open; the group commit writes a message into one and renames it into
C{incoming/} under the message's queue ID, and the daemon tops the set up
in its spool threads between groups, off the path of any client waiting
for its 250.

A spare is an empty file named C{tmp/spare-*}: like everything else in
C{tmp/}, it is removed at the next start (L{FileStore.clean_tmp}).  Only
the daemon keeps spares; C{mtactl} and C{mta-sendmail} create their files
as they go.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable

PREFIX = "spare-"
TARGET = 64  # spares kept ready: a few groups' worth at full speed


class SpareFiles:
    """A thread-safe set of empty, open files in one directory.

    @param create: makes a file at a path and returns its descriptor
        (L{mta.spool.fs.FileOps.create}, so fault tests reach it).
    @param close: closes a descriptor.
    """

    def __init__(
        self,
        directory: str,
        create: Callable[[str], int],
        close: Callable[[int], None],
        target: int = TARGET,
    ) -> None:
        self.directory = directory
        self.target = target
        self._create = create
        self._close = close
        self._ready: deque[tuple[str, int]] = deque()
        self._lock = threading.Lock()
        self._names = itertools.count()
        #: The names of this process's spares begin so.
        self.prefix = f"{PREFIX}{os.getpid()}-"
        self._refilling = False

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> tuple[str, int] | None:
        """A spare (its path and open descriptor), or None when none is ready."""
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    def wanted(self) -> bool:
        """Whether a refill should run now: fewer than half the target left
        (so that a refill, one hand-off to a thread, makes many), and none
        running."""
        with self._lock:
            if self._refilling or len(self._ready) * 2 >= self.target:
                return False
            self._refilling = True
            return True

    def refill(self) -> int:
        """Make spares up to the target (in a spool thread, after L{wanted});
        returns how many were made.  Stops at the first error (a full disk):
        commits then create their files themselves, and report the error."""
        made = 0
        try:
            while len(self._ready) < self.target:
                path = os.path.join(self.directory, self.prefix + str(next(self._names)))
                try:
                    fd = self._create(path)
                except OSError:
                    break
                self._ready.append((path, fd))
                made += 1
        finally:
            with self._lock:
                self._refilling = False
        return made

    def close(self) -> None:
        """Close and remove every spare (at shutdown)."""
        while (spare := self.take()) is not None:
            path, fd = spare
            with contextlib.suppress(OSError):
                self._close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
