# twistd plugin: `twistd fsha --config FILE [--node NAME]`. fsha.tap is imported only when
# the plugin is used, so listing plugins stays cheap. (No __init__.py in twisted/ or
# twisted/plugins/: they are namespace directories shared with Twisted's own plugins.)
from twisted.application.service import ServiceMaker

fsha = ServiceMaker(
    "fsha",
    "fsha.tap",
    "A FreeSWITCH high-availability cluster node (N+x, heartbeats, takeover).",
    "fsha",
)
