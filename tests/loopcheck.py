"""File work on an event loop's thread, caught with an audit hook (issue 9: the forwarder's loop
never blocks on a file or a subprocess; heartbeats every 0.2 s share it).

    with file_work_on_this_thread() as seen:
        asyncio.run(something())
    assert not seen, seen

The loop runs in the calling thread, so anything recorded was done on the loop; work handed to
`asyncio.to_thread` runs elsewhere and is not. Blocking subprocesses (`subprocess.run`, Popen)
count; asyncio's own (create_subprocess_exec) do not. Module imports (which open .py files) and
/dev/null (asyncio's subprocess plumbing) are not counted. An audit hook cannot be removed:
it is installed once and does nothing unless armed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

WATCHED = frozenset({"open", "os.chmod", "os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.listdir",
                     "os.scandir", "glob.glob", "shutil.rmtree", "tempfile.mkdtemp", "tempfile.mkstemp",
                     "subprocess.Popen"})
_ASYNCIO_SUBPROCESS = (f"asyncio{os.sep}base_subprocess.py", f"asyncio{os.sep}unix_events.py")
_IGNORED_SUFFIXES = (".py", ".pyc", ".so", "/dev/null")
_armed: dict[int, list[tuple[str, str]]] = {}


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _armed or event not in WATCHED:
        return
    seen = _armed.get(threading.get_ident())
    if seen is None:
        return
    target = str(args[0]) if args else ""
    if event == "open" and (target.endswith(_IGNORED_SUFFIXES) or isinstance(args[0], int)):
        return
    if event == "subprocess.Popen" and _started_by_asyncio():
        return  # asyncio's subprocesses: started on the loop, awaited without blocking it
    seen.append((event, target))


sys.addaudithook(_hook)


def _started_by_asyncio() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(_ASYNCIO_SUBPROCESS):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


@contextlib.contextmanager
def file_work_on_this_thread() -> Iterator[list[tuple[str, str]]]:
    """(event, path) of each file operation this thread does inside the block."""
    seen: list[tuple[str, str]] = []
    _armed[threading.get_ident()] = seen
    try:
        yield seen
    finally:
        _armed.pop(threading.get_ident(), None)
