"""The XML-CDR-shaped document stored in ``recovery.metadata``, and its parser (no I/O).

FreeSWITCH stores the channel's full XML CDR (channel data, all variables, app log,
callflow with the caller profile and times). The simulator writes the same shape and reads
back what it needs to rebuild a live channel on recovery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from fsha.fsdb.cdr import CDRError, read_cdr
from fsha.sim.calls import CS_NUMBERS, Channel
from fsha.wire.esl import url_encode


def _usec(epoch: float | None) -> str:
    return "0" if epoch is None else str(int(epoch * 1_000_000))


_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*\Z")


def _el(tag: str, text: str) -> str:
    return f"<{tag}>{escape(text)}</{tag}>"


def build_cdr(channel: Channel, core_uuid: str, switchname: str) -> str:
    """The metadata document for ``channel`` (built as text: this runs on every answer
    and bridge, so it avoids an element tree)."""
    out = [
        '<?xml version="1.0"?>\n',
        f"<cdr core-uuid={quoteattr(core_uuid)} switchname={quoteattr(switchname)}>",
        "<channel_data>",
        _el("state", channel.state),
        _el("direction", channel.direction),
        _el("state_number", str(CS_NUMBERS[channel.state])),
        "<flags>0=1;1=1;3=1;38=1;39=1;41=1;54=1;76=1;113=1;114=1;160=1</flags>",
        "<caps>1=1;2=1;3=1;4=1;5=1;6=1</caps>",
        "</channel_data><variables>",
    ]
    match = _TAG.match
    # variables are URL-encoded, as in FreeSWITCH's XML CDR (any byte survives)
    out.extend(_el(k, url_encode(v, True)) for k, v in channel.variables.items() if match(k))
    out.append("</variables><app_log>")
    out.extend(
        f"<application app_name={quoteattr(app)} app_data={quoteattr(data)} "
        f'app_stamp="{_usec(stamp)}"></application>'
        for app, data, stamp in channel.app_log
    )
    out.append(
        f"</app_log><callflow dialplan={quoteattr(channel.dialplan)} "
        f'unique-id={quoteattr(channel.uuid)} profile_index="1">'
        f"<extension name={quoteattr(channel.dest)} number={quoteattr(channel.dest)}>"
    )
    if channel.application:
        out.append(
            f"<application app_name={quoteattr(channel.application)} "
            f"app_data={quoteattr(channel.application_data)}></application>"
        )
    out.append("</extension><caller_profile>")
    for tag, text in (
        ("username", channel.cid_num),
        ("dialplan", channel.dialplan),
        ("caller_id_name", channel.cid_name),
        ("ani", channel.cid_num),
        ("aniii", ""),
        ("caller_id_number", channel.cid_num),
        ("network_addr", channel.network_addr),
        ("rdnis", ""),
        ("destination_number", channel.dest),
        ("uuid", channel.uuid),
        ("source", "mod_sofia"),
        ("context", channel.context),
        ("chan_name", channel.name),
    ):
        out.append(_el(tag, text))
    out.append("</caller_profile><times>")
    for tag, value in (
        ("created_time", channel.created),
        ("profile_created_time", channel.created),
        ("progress_time", None),
        ("progress_media_time", None),
        ("answered_time", channel.answered),
        ("bridged_time", channel.bridged),
        ("last_hold_time", None),
        ("hold_accum_time", None),
        ("hangup_time", None),
        ("resurrect_time", None),
        ("transfer_time", None),
    ):
        out.append(f"<{tag}>{_usec(value)}</{tag}>")
    out.append("</times></callflow></cdr>")
    return "".join(out)


@dataclass(slots=True)
class CDRInfo:
    """What recovery needs from a stored CDR."""

    uuid: str
    direction: str
    chan_name: str
    cid_name: str
    cid_num: str
    dest: str
    network_addr: str
    context: str
    dialplan: str
    created: float | None
    answered: float | None
    application: str
    application_data: str
    variables: dict[str, str]


def _epoch(text: str | None) -> float | None:
    if not text or not text.isdigit() or text == "0":
        return None
    return int(text) / 1_000_000


def parse_cdr(metadata: str) -> CDRInfo:
    """Parse a stored CDR; raises :class:`CDRError` (only) on anything unusable."""
    root, variables = read_cdr(metadata)
    cp = root.find("callflow/caller_profile")
    times = root.find("callflow/times")

    def cpv(tag: str) -> str:
        if cp is None:
            return ""
        el = cp.find(tag)
        return (el.text or "") if el is not None else ""

    def tv(tag: str) -> float | None:
        if times is None:
            return None
        el = times.find(tag)
        return _epoch(el.text) if el is not None else None

    uuid = variables.get("uuid") or cpv("uuid")
    if not uuid:
        raise CDRError("metadata has no channel uuid")
    app_el = root.find("callflow/extension/application")
    direction_el = root.find("channel_data/direction")
    direction = (direction_el.text or "") if direction_el is not None else ""
    return CDRInfo(
        uuid=uuid,
        direction=direction or variables.get("direction", "inbound"),
        chan_name=cpv("chan_name") or variables.get("channel_name", ""),
        cid_name=cpv("caller_id_name"),
        cid_num=cpv("caller_id_number"),
        dest=cpv("destination_number"),
        network_addr=cpv("network_addr"),
        context=cpv("context") or "default",
        dialplan=cpv("dialplan") or "XML",
        created=tv("created_time"),
        answered=tv("answered_time"),
        application=app_el.get("app_name", "") if app_el is not None else "",
        application_data=app_el.get("app_data", "") if app_el is not None else "",
        variables=variables,
    )
