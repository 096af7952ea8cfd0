"""Log observers for twistd's ``--logger`` option.

    twistd -n --logger=fsha.logs.json fsha --config ...   # one JSON object per line
    twistd -n fsha --config ...                           # plain text (twistd's default)

Every line of a JSON log carries the event's keyword fields (``node``, ``slot``, ``epoch``,
``takeover``, ``peer``, ...), so a log shipper can index them; ``takeover`` (``SLOT/EPOCH``)
is the same on every node for one takeover, which joins its story across the cluster.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json() -> ILogObserver:
    """JSON lines on standard output (what systemd's journal or a shipper reads)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
