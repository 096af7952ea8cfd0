"""sipp as the caller of the real-FreeSWITCH tier: REGISTERs, and calls that survive a
takeover (the caller answers the new master's re-INVITE, then its own BYE must be answered
200). Every run is bounded in count and time."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SIPP = shutil.which("sipp")

REGISTER = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="fsha register">
  <send retrans="500">
    <![CDATA[
      REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:[field0]@[remote_ip]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[field0]@[remote_ip]>
      Call-ID: [call_id]
      CSeq: 1 REGISTER
      Contact: <sip:[field0]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Expires: 3600
      User-Agent: fsha-test-sipp
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""

# A call answered by the slot, then held until the new master's re-INVITE (answered with
# the same SDP), then ended by the caller: its BYE must get a 200. Any other request (a BYE
# from the old master) is unexpected and fails the call.
CALL = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="fsha call survives a takeover">
  <send retrans="500">
    <![CDATA[
      INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:caller[call_number]@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:caller[call_number]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rtd="true"/>
  <send>
    <![CDATA[
      ACK sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:caller[call_number]@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Contact: <sip:caller[call_number]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv request="INVITE" timeout="TIMEOUT_MS" ontimeout="noreinvite"/>
  <send>
    <![CDATA[
      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:caller[call_number]@[local_ip]:[local_port]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687638 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
    ]]>
  </send>
  <recv request="ACK"/>
  <!-- the call goes on a while on the new master, then the caller hangs up -->
  <pause milliseconds="2000"/>
  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: <sip:caller[call_number]@[local_ip]:[local_port]>;tag=[pid]SIPpTag09[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: <sip:caller[call_number]@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
  <label id="noreinvite"/>
</scenario>
"""


def register(host: str, port: int, users: list[str], work: Path, timeout: float = 30) -> None:
    """REGISTER each user (blocking); raises if one is not answered 200."""
    assert SIPP is not None
    work = work.resolve()
    (work / "register.xml").write_text(REGISTER)
    (work / "users.csv").write_text("SEQUENTIAL\n" + "".join(u + "\n" for u in users))
    done = subprocess.run(
        [SIPP, "-sf", str(work / "register.xml"), "-inf", str(work / "users.csv"),
         "-i", "127.0.0.1", "-p", "0", "-m", str(len(users)), "-r", "50", "-nostdin",
         "-timeout", f"{int(timeout)}s", "-timeout_error", f"{host}:{port}"],
        capture_output=True, cwd=work, timeout=timeout + 10)
    if done.returncode != 0:
        raise AssertionError(f"sipp REGISTER exited {done.returncode}: {done.stderr[-1000:]!r}")


def start_calls(host: str, port: int, calls: int, work: Path, reinvite_within: float,
                local_port: int, *, local_ip: str = "127.0.0.1", netns: str | None = None,
                rate: int = 50) -> subprocess.Popen[bytes]:
    """``calls`` calls to the slot (sipp in the background, inside ``netns`` if given);
    :func:`finish_calls` waits."""
    assert SIPP is not None
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "call.xml").write_text(CALL.replace("TIMEOUT_MS", str(int(reinvite_within * 1000))))
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.Popen(
        [*prefix, SIPP, "-sf", str(work / "call.xml"), "-s", "2000", "-i", local_ip,
         "-p", str(local_port), "-m", str(calls), "-r", str(rate), "-l", str(calls),
         "-max_socket", str(calls + 100), "-nostdin",
         "-timeout", f"{int(reinvite_within + 30)}s", "-timeout_error",
         "-trace_err", "-trace_msg", f"{host}:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=work)


def finish_calls(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    """sipp's exit code (0: every call went through the whole scenario) and stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace")[-2000:]
