"""The MQTT topic layout, in one place: what the daemon subscribes to and where it publishes.

    <prefix>/<cell>/real                      real-network transitions (telemetry contract)
    <prefix>/<cell>/twin/<twin>               a twin's transitions
    <prefix>/<cell>/twin/<twin>/resync        resync events (QoS 1, not retained)
    <prefix>/<cell>/twin/<twin>/status        per-twin status (retained)
    <prefix>/<cell>/twin/<twin>/resynced      acknowledgements from controllers: the twin was resynchronised
    <prefix>/_daemon/<instance>/status        daemon liveness: online / offline (retained, last will)
    <prefix>/_daemon/<instance>/heartbeat     {"state", "time", "every_seconds", "expires_at"} (retained)
"""

from __future__ import annotations

from dataclasses import dataclass

REAL = "real"


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix."""

    prefix: str

    def real(self, cell: str) -> str:
        return f"{self.prefix}/{cell}/real"

    def twin(self, cell: str, twin: str) -> str:
        return f"{self.prefix}/{cell}/twin/{twin}"

    def resync(self, cell: str, twin: str) -> str:
        return f"{self.twin(cell, twin)}/resync"

    def status(self, cell: str, twin: str) -> str:
        return f"{self.twin(cell, twin)}/status"

    def resynced(self, cell: str, twin: str) -> str:
        return f"{self.twin(cell, twin)}/resynced"

    def daemon_status(self, instance: str) -> str:
        return f"{self.prefix}/_daemon/{instance}/status"

    def daemon_heartbeat(self, instance: str) -> str:
        return f"{self.prefix}/_daemon/{instance}/heartbeat"

    def telemetry_filters(self, cell: str) -> list[str]:
        """What a daemon serving `cell` subscribes to: its real stream, every twin stream and every twin's
        acknowledgements (known twins or not, so that input for an undeclared twin is counted as rejected rather
        than unseen)."""
        return [self.real(cell), f"{self.prefix}/{cell}/twin/+", f"{self.prefix}/{cell}/twin/+/resynced"]

    def parse_telemetry(self, topic: str) -> tuple[str, str] | None:
        """(cell, stream) of a telemetry topic, stream being ``real`` or the twin's name; None otherwise."""
        if not topic.startswith(self.prefix + "/"):
            return None
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == REAL and parts[0]:
            return parts[0], REAL
        if len(parts) == 3 and parts[1] == "twin" and parts[0] and parts[2] and parts[2] != REAL:
            return parts[0], parts[2]
        return None

    def parse_ack(self, topic: str) -> tuple[str, str] | None:
        """(cell, twin) of an acknowledgement topic; None otherwise."""
        if not (topic.startswith(self.prefix + "/") and topic.endswith("/resynced")):
            return None
        parts = topic[len(self.prefix) + 1 :].split("/")
        if len(parts) == 4 and parts[1] == "twin" and parts[0] and parts[2]:
            return parts[0], parts[2]
        return None
