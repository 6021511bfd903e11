"""File work on an event loop's thread, caught with an audit hook (issue 9: the forwarder's loop
never blocks on a file or a subprocess; heartbeats every 0.2 s share it).

    with file_work_on_this_thread() as seen:
        asyncio.run(something())
    assert not seen, seen

The loop runs in the calling thread, so anything recorded was done on the loop; work handed to
`asyncio.to_thread` runs elsewhere and is not. Module imports (which open .py files) and
/dev/null (asyncio's own subprocess plumbing) are not counted. An audit hook cannot be removed:
it is installed once and does nothing unless armed.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from typing import Any

WATCHED = frozenset({"open", "os.chmod", "os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.listdir",
                     "os.scandir", "glob.glob", "shutil.rmtree", "tempfile.mkdtemp", "tempfile.mkstemp"})
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
    seen.append((event, target))


sys.addaudithook(_hook)


@contextlib.contextmanager
def file_work_on_this_thread() -> Iterator[list[tuple[str, str]]]:
    """(event, path) of each file operation this thread does inside the block."""
    seen: list[tuple[str, str]] = []
    _armed[threading.get_ident()] = seen
    try:
        yield seen
    finally:
        _armed.pop(threading.get_ident(), None)
