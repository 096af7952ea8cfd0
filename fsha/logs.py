"""Log observers for twistd's ``--logger`` option.

    twistd -n --logger=fsha.logs.json fsha --config ...   # one JSON object per line
    twistd --logger=fsha.logs.json --logfile=/var/log/fsha/fsha.log fsha --config ...
    twistd -n fsha --config ...                           # plain text (twistd's default)

Every line of a JSON log carries the event's keyword fields (``node``, ``slot``, ``epoch``,
``takeover``, ``peer``, ...), so a log shipper can index them, and ``text``: the message as
the plain-text log would show it. ``takeover`` (``SLOT/EPOCH``) is the same on every node for
one takeover, which joins its story across the cluster. With ``--logfile`` the lines go to
that file (rotated by size as twistd rotates its own), else to standard output.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, eventAsJSON, formatEvent
from twisted.python.logfile import LogFile


def logfile_argument(argv: Sequence[str]) -> str | None:
    """The value of twistd's ``--logfile``/``-l`` in ``argv`` (twistd's own options, before
    the subcommand); None when not given or ``-``."""
    value: str | None = None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "fsha":
            break  # the subcommand: what follows are fsha's options
        if arg in ("--logfile", "-l") and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--logfile="):
            value = arg.partition("=")[2]
        elif arg.startswith("-l") and not arg.startswith("--") and len(arg) > 2:
            value = arg[2:]
        i += 1
    return None if value in (None, "", "-") else value


def render_json(event: dict[str, Any]) -> str:
    """One JSON line: Twisted's own encoding of the event plus its rendered ``text``."""
    text = formatEvent(event)
    if event.get("log_failure") is not None:
        try:
            text += "\n" + event["log_failure"].getTraceback()
        except Exception:  # a failure that cannot render must not lose the line
            pass
    return eventAsJSON({**event, "text": text}) + "\n"


def json(argv: Sequence[str] | None = None, out: IO[str] | None = None) -> ILogObserver:
    """JSON lines to ``--logfile`` if twistd was given one, else to standard output (what
    systemd's journal or a shipper reads)."""
    if out is None:
        path = logfile_argument(sys.argv if argv is None else argv)
        out = LogFile.fromFullPath(path) if path else sys.stdout  # type: ignore[assignment]
    return FileLogObserver(out, render_json)  # type: ignore[arg-type]
