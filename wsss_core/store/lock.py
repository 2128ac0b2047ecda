"""One process per folder: a lock file holding pid, host, a token and the command.

The lock appears complete or not at all: it is written to a private file and
hard-linked into place (`link` fails atomically when the lock exists, so two
processes cannot both take it). A lock left by a dead process is taken over
with a message, under an OS lock on the folder (`fcntl.flock`), so of two
processes that both find the dead holder only one replaces its lock (the other
then finds the new holder alive); a live holder makes `FolderLock.hold` raise
RunLockedError naming its pid. Child processes that carry the holder's token in
$WSSS_LOCK_TOKEN (the notebooks of `wsss run`) share the lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

from .files import file_errors

LOCK = ".wsss.lock"
LOCK_TOKEN_ENV = "WSSS_LOCK_TOKEN"  # a child of the lock holder (a pipeline's notebook) shares its lock


class RunLockedError(RuntimeError):
    """Another live process is working on the same folder."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def process_alive(pid: int, host: str) -> bool:
    """Whether process `pid` on `host` still runs (another host: assumed alive;
    a zombie, killed and not yet reaped by its parent, does not run)."""
    if host != socket.gethostname():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Linux: the process's state in /proc is Z (elsewhere: False)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].startswith("Z")  # the name, in parentheses, may hold anything


class FolderLock:
    """The lock file of one folder (`<folder>/.wsss.lock`), re-entrant in this process."""

    def __init__(self, folder: str | Path, name: str = LOCK):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.token: str | None = None
        self._depth = 0

    @contextlib.contextmanager
    def hold(self, command: str = "") -> Iterator[None]:
        """Hold the lock while working (shared with children carrying its token)."""
        if self._depth or self.inherited():
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with file_errors(self.folder, "creating"):
            self.folder.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "token": token, "started": now_iso(),
                "command": command}
        mine = self.folder / f"{self.path.name}.{os.getpid()}.{token[:8]}"
        with file_errors(self.folder, "writing"):
            mine.write_text(json.dumps(info))
        try:
            self._link(mine)
        finally:
            with contextlib.suppress(FileNotFoundError):
                mine.unlink()
        self.token, self._depth = token, 1
        try:
            yield
        finally:
            self._depth = 0
            self.token = None
            held = self.read()
            if held and held.get("token") == token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()

    def _link(self, mine: Path) -> None:
        """Link our lock file into place; take over a lock whose process is gone (only under the folder's
        take-over guard, and only the lock read as dead under it: no other taker can have replaced it)."""
        with file_errors(self.folder, "writing"):
            if self._try_link(mine):
                return
            with self._takeover_guard():
                for _ in range(100):  # each turn: the lock went away (link again) or is dead (replace it)
                    held = self.read()  # complete by construction (linked), or gone
                    self.refuse_if_held(held)
                    if held is not None:
                        print(f"[wsss] {self.folder}: taking over the lock left by pid {held.get('pid')} "
                              "(no longer running)", flush=True)
                        with contextlib.suppress(FileNotFoundError):
                            self.path.unlink()
                    if self._try_link(mine):
                        return
        raise RunLockedError(f"{self.folder}: could not take the lock {self.path}")

    def _try_link(self, mine: Path) -> bool:
        try:
            os.link(mine, self.path)
            return True
        except FileExistsError:
            return False

    @contextlib.contextmanager
    def _takeover_guard(self) -> Iterator[None]:
        """An exclusive OS lock on the folder itself (released by the kernel if this process dies)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: the hard link alone
            yield
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def refuse_if_held(self, held: dict[str, Any] | None = None) -> None:
        """Raise RunLockedError naming the holder if a live process holds the lock (`held`: as read, or read now);
        a look before work that takes the lock later, so the user hears "in use", not what it left half-done."""
        held = self.read() if held is None else held
        if held and process_alive(int(held.get("pid", -1)), str(held.get("host", ""))):
            raise RunLockedError(
                f"{self.folder}: in use by pid {held.get('pid')} on {held.get('host')} since "
                f"{held.get('started')} ({held.get('command') or 'wsss'}); wait for it to finish or stop it"
            )

    def inherited(self) -> bool:
        """This process is a child of the holder (same token in $WSSS_LOCK_TOKEN)."""
        token = os.environ.get(LOCK_TOKEN_ENV)
        held = self.read()
        return bool(token) and bool(held) and held.get("token") == token  # type: ignore[union-attr]

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            return None
