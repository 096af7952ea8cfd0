"""Simulated channels (no I/O): the state a sofia channel carries and shows in events."""

from __future__ import annotations

from dataclasses import dataclass, field

# switch_channel_state_t names and numbers
CS_NUMBERS: dict[str, int] = {
    "CS_NEW": 0,
    "CS_INIT": 1,
    "CS_ROUTING": 2,
    "CS_SOFT_EXECUTE": 3,
    "CS_EXECUTE": 4,
    "CS_EXCHANGE_MEDIA": 5,
    "CS_PARK": 6,
    "CS_CONSUME_MEDIA": 7,
    "CS_HIBERNATE": 8,
    "CS_RESET": 9,
    "CS_HANGUP": 10,
    "CS_REPORTING": 11,
    "CS_DESTROY": 12,
}

# hangup cause names and Q.850 codes the simulator uses
HANGUP_CAUSES: dict[str, int] = {
    "NORMAL_CLEARING": 16,
    "USER_BUSY": 17,
    "NO_ANSWER": 19,
    "CALL_REJECTED": 21,
    "DESTINATION_OUT_OF_ORDER": 27,
    "NORMAL_UNSPECIFIED": 31,
    "NORMAL_TEMPORARY_FAILURE": 41,
    "SWITCH_CONGESTION": 42,
    "MANAGER_REQUEST": 503,
    "SYSTEM_SHUTDOWN": 501,
    "ORIGINATOR_CANCEL": 487,
    "CHAN_NOT_IMPLEMENTED": 66,
    "LOSE_RACE": 502,
    "CRASH": 700,
}


def _usec(epoch: float | None) -> str:
    return "0" if epoch is None else str(int(epoch * 1_000_000))


class SimError(ValueError):
    """A request to the simulator that cannot be done (bad profile, unknown call...)."""


@dataclass(slots=True)
class Channel:
    """One sofia channel of the simulator."""

    uuid: str
    profile: str
    direction: str  # "inbound" | "outbound"
    name: str  # Channel-Name, e.g. sofia/internal/1000@127.0.0.1
    cid_name: str
    cid_num: str
    dest: str
    network_addr: str
    created: float
    context: str = "default"
    dialplan: str = "XML"
    state: str = "CS_INIT"
    callstate: str = "DOWN"
    answer_state: str = "ringing"
    answered: float | None = None
    bridged: float | None = None
    hangup_time: float | None = None
    hangup_cause: str | None = None
    other_leg: str | None = None
    call_uuid: str | None = None
    recovered: bool = False
    application: str = ""
    application_data: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    app_log: list[tuple[str, str, float]] = field(default_factory=list)

    def event_headers(self, other: Channel | None = None) -> list[tuple[str, str]]:
        """The headers ``switch_channel_event_set_data`` adds for this channel."""
        h: list[tuple[str, str]] = [
            ("Channel-State", self.state),
            ("Channel-Call-State", self.callstate),
            ("Channel-State-Number", str(CS_NUMBERS[self.state])),
            ("Channel-Name", self.name),
            ("Unique-ID", self.uuid),
            ("Call-Direction", self.direction),
            ("Presence-Call-Direction", self.direction),
            ("Channel-HIT-Dialplan", "true" if self.direction == "inbound" else "false"),
            ("Channel-Call-UUID", self.call_uuid or self.uuid),
            ("Answer-State", self.answer_state),
        ]
        if self.hangup_cause is not None:
            h.append(("Hangup-Cause", self.hangup_cause))
        h += [
            ("Channel-Read-Codec-Name", "PCMU"),
            ("Channel-Read-Codec-Rate", "8000"),
            ("Channel-Read-Codec-Bit-Rate", "64000"),
            ("Channel-Write-Codec-Name", "PCMU"),
            ("Channel-Write-Codec-Rate", "8000"),
            ("Channel-Write-Codec-Bit-Rate", "64000"),
        ]
        h += self._caller_headers("Caller")
        if other is not None:
            h.append(("Other-Type", "originatee" if self.direction == "inbound" else "originator"))
            h += other._caller_headers("Other-Leg")
        h += [("variable_" + k, v) for k, v in self.variables.items()]
        return h

    def _caller_headers(self, prefix: str) -> list[tuple[str, str]]:
        return [
            (prefix + "-Direction", self.direction),
            (prefix + "-Logical-Direction", self.direction),
            (prefix + "-Username", self.cid_num),
            (prefix + "-Dialplan", self.dialplan),
            (prefix + "-Caller-ID-Name", self.cid_name),
            (prefix + "-Caller-ID-Number", self.cid_num),
            (prefix + "-Orig-Caller-ID-Name", self.cid_name),
            (prefix + "-Orig-Caller-ID-Number", self.cid_num),
            (prefix + "-Network-Addr", self.network_addr),
            (prefix + "-ANI", self.cid_num),
            (prefix + "-Destination-Number", self.dest),
            (prefix + "-Unique-ID", self.uuid),
            (prefix + "-Source", "mod_sofia"),
            (prefix + "-Context", self.context),
            (prefix + "-Channel-Name", self.name),
            (prefix + "-Profile-Index", "1"),
            (prefix + "-Profile-Created-Time", _usec(self.created)),
            (prefix + "-Channel-Created-Time", _usec(self.created)),
            (prefix + "-Channel-Answered-Time", _usec(self.answered)),
            (prefix + "-Channel-Progress-Time", "0"),
            (prefix + "-Channel-Progress-Media-Time", "0"),
            (prefix + "-Channel-Hangup-Time", _usec(self.hangup_time)),
            (prefix + "-Channel-Transfer-Time", "0"),
            (prefix + "-Channel-Resurrect-Time", "0"),
            (prefix + "-Channel-Bridged-Time", _usec(self.bridged)),
            (prefix + "-Channel-Last-Hold", "0"),
            (prefix + "-Channel-Hold-Accum", "0"),
            (prefix + "-Screen-Bit", "true"),
            (prefix + "-Privacy-Hide-Name", "false"),
            (prefix + "-Privacy-Hide-Number", "false"),
        ]

    def summary(self) -> dict[str, object]:
        """A JSON-friendly view for the control interface."""
        return {
            "uuid": self.uuid,
            "profile": self.profile,
            "direction": self.direction,
            "name": self.name,
            "caller": self.cid_num,
            "dest": self.dest,
            "state": self.state,
            "callstate": self.callstate,
            "answered": self.answered is not None,
            "other_leg": self.other_leg,
            "recovered": self.recovered,
            "local_media_port": self.variables.get("local_media_port"),
        }


# Columns of ``show channels`` (the ``channels`` view of the core DB), in order.
SHOW_CHANNELS_COLUMNS: tuple[str, ...] = (
    "uuid", "direction", "created", "created_epoch", "name", "state", "cid_name", "cid_num",
    "ip_addr", "dest", "application", "application_data", "dialplan", "context", "read_codec",
    "read_rate", "read_bit_rate", "write_codec", "write_rate", "write_bit_rate", "secure",
    "hostname", "presence_id", "presence_data", "accountcode", "callstate", "callee_name",
    "callee_num", "callee_direction", "call_uuid", "sent_callee_name", "sent_callee_num",
    "initial_cid_name", "initial_cid_num", "initial_ip_addr", "initial_dest",
    "initial_dialplan", "initial_context",
)  # fmt: skip
