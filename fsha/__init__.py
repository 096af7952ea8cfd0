"""fsha: an N+x high-availability cluster manager for FreeSWITCH."""

__version__ = "0.1.0"
