"""Codecs without I/O: bytes in, typed messages out, and back.

Each wire format fsha speaks has one module here, documented byte by byte in
``docs/protocol.rst``.
"""
