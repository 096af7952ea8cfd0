"""A FreeSWITCH simulator that behaves like the real switch on the wire and in its tables.

Layout (logic without I/O first, thin Twisted adapters last):

- :mod:`fsha.sim.events`: FreeSWITCH-shaped events (core headers, channel headers).
- :mod:`fsha.sim.coredb`: the SQLite core DB (``recovery``, ``sip_registrations``).
- :mod:`fsha.sim.cdr`: the XML-CDR document stored as recovery metadata, and its parser.
- :mod:`fsha.sim.switch`: the simulated switch: profiles, channels, registrations, API.
- :mod:`fsha.sim.esl_server`: the Event Socket server (inbound mode).
- :mod:`fsha.sim.sip`: the per-profile SIP UDP responder (``OPTIONS``).
- :mod:`fsha.sim.control`: the HTTP JSON control interface for tests and the demo.
- :mod:`fsha.sim.cli`: ``fsha sim``.
"""
