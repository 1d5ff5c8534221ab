"""systemd's notify protocol: tell the service manager when we are ready, reloading or stopping, and that we live.

With `Type=notify` systemd waits for READY=1 before it calls the unit started, and with `WatchdogSec=` it restarts
the service if WATCHDOG=1 stops arriving. Outside systemd (NOTIFY_SOCKET unset) every call does nothing, so the
daemon calls these unconditionally.

The datagrams are sent by `sdnotify`, which also maps an abstract socket address (`@name`) to its Linux form.
Protocol: sd_notify(3).
"""

from __future__ import annotations

import os
import time

import sdnotify
import structlog

log = structlog.get_logger()


class SystemdNotifier:
    """Sends sd_notify(3) messages to the socket named by NOTIFY_SOCKET, as read from the environment at creation.

    Every method returns whether a message was sent. A failure to reach the socket is logged, never raised: the
    service keeps working, and systemd's own timeouts (TimeoutStartSec=, WatchdogSec=) act on the missing message.
    Sending blocks only if systemd's receive queue is full, as libsystemd's sd_notify() would.
    """

    def __init__(self) -> None:
        env = os.environ
        self._address = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._notifier: sdnotify.SystemdNotifier | None = None
        if self._address is not None:
            try:
                # debug=True: raise instead of silently dropping, so that a broken socket is logged once here.
                self._notifier = sdnotify.SystemdNotifier(debug=True)
            except OSError as e:
                log.warning("systemd notify socket unreachable", address=self._address, error=str(e))

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (we run under systemd with a reachable notify socket)."""
        return self._notifier is not None

    def ready(self) -> bool:
        """Start-up (or a reload) is complete: systemd marks the unit active and `systemctl start` returns."""
        return self._send("READY=1")

    def reloading(self) -> bool:
        """A reload (SIGHUP) has begun; send `ready()` when it is done, or the unit stays 'reloading'.

        MONOTONIC_USEC lets systemd >= 253 match this message to the reload it asked for; older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        """Shutdown has begun, so systemd does not read the exit as a crash in progress."""
        return self._send("STOPPING=1")

    def watchdog(self) -> bool:
        """Still alive: send at least every `watchdog_interval()` seconds, from the event loop it vouches for."""
        return self._send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """One line for `systemctl status`, e.g. "monitoring 3 twins, broker connected"."""
        # A newline would end the STATUS= field and start another assignment (e.g. READY=1): keep it one line.
        return self._send("STATUS=" + " ".join(text.splitlines()))

    def watchdog_interval(self) -> float | None:
        """Seconds between watchdog pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends.

        None when there is nothing to ping: notification disabled, no watchdog configured, or the watchdog meant
        for another process (WATCHDOG_PID set to a pid that is not ours).
        """
        if self._notifier is None or self._watchdog_usec is None:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != str(os.getpid()):
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None

    def _send(self, state: str) -> bool:
        if self._notifier is None:
            return False
        # sdnotify encodes as Latin-1; systemd reads UTF-8. Handing it the UTF-8 bytes spelled as Latin-1
        # characters sends exactly those bytes, and no text can fail to encode.
        try:
            self._notifier.notify(state.encode().decode("latin-1"))
        except OSError as e:
            log.warning("systemd notify failed", address=self._address, message=state.split("=", 1)[0], error=str(e))
            return False
        return True
