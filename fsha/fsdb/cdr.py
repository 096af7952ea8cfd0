"""The XML CDR FreeSWITCH stores as a call's recovery ``metadata`` (docs/freeswitch.rst).

Read by fsha (the limits a call holds) and by the simulator (to rebuild a recovered call).
No I/O.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from fsha.wire.esl import url_decode


class CDRError(ValueError):
    """Metadata that is not an XML CDR."""


def read_cdr(metadata: str | bytes) -> tuple[ET.Element, dict[str, str]]:
    """The document's root and its channel variables (URL-decoded as FreeSWITCH encodes
    them). Raises :class:`CDRError` (only) if it is not XML or not a ``<cdr>``."""
    try:
        root = ET.fromstring(metadata)
    except (ET.ParseError, ValueError) as e:
        raise CDRError(f"metadata is not XML: {e}") from None
    if root.tag != "cdr":
        raise CDRError(f"metadata root is <{root.tag}>, not <cdr>")
    variables: dict[str, str] = {}
    vs = root.find("variables")
    if vs is not None:
        for el in vs:
            variables[el.tag] = url_decode(el.text or "")
    return root, variables
