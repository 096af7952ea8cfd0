"""FreeSWITCH's own databases (SQLite), below replication and the takeover.

- :mod:`~fsha.fsdb.rows`: the rows (``recovery``, ``sip_registrations``);
- :mod:`~fsha.fsdb.codecs`: their replicated values (``docs/protocol/records.rst``);
- :mod:`~fsha.fsdb.reader`: reading them, read-only (the replication feeds);
- :mod:`~fsha.fsdb.writer`: writing a dead master's rows (the takeover);
- :mod:`~fsha.fsdb.runner`: the thread the operations run on;
- :mod:`~fsha.fsdb.connection`: one connection per file.
"""

from fsha.fsdb.codecs import (
    CALL_VALUE_VERSION,
    MAX_METADATA_BYTES,
    RecordValueError,
    call_profile,
    decode_call_row,
    decode_registration,
    encode_call_row,
    encode_registration,
    encode_registration_v1,
)
from fsha.fsdb.reader import LOOKUP_BATCH, CoreDBReader, CoreDBReads
from fsha.fsdb.rows import (
    REGISTRATION_COLUMNS,
    CallRow,
    CallSummary,
    RecoveryRow,
    RegistrationRow,
    registration_key,
    registration_prefix,
    summary_of,
)
from fsha.fsdb.runner import Runner, ThreadRunner, inline_runner
from fsha.fsdb.writer import FOREIGN_RUNTIME_PREFIX, CoreDBError, CoreDBWriter

__all__ = [
    "CALL_VALUE_VERSION",
    "FOREIGN_RUNTIME_PREFIX",
    "LOOKUP_BATCH",
    "MAX_METADATA_BYTES",
    "REGISTRATION_COLUMNS",
    "CallRow",
    "CallSummary",
    "CoreDBError",
    "CoreDBReader",
    "CoreDBReads",
    "CoreDBWriter",
    "RecordValueError",
    "RecoveryRow",
    "RegistrationRow",
    "Runner",
    "ThreadRunner",
    "call_profile",
    "decode_call_row",
    "decode_registration",
    "encode_call_row",
    "encode_registration",
    "encode_registration_v1",
    "inline_runner",
    "registration_key",
    "registration_prefix",
    "summary_of",
]
