"""Where the module's runs compute: this computer (the worker process) or an ``oflsam2 serve``
server, as chosen under "Compute on" in the module and the Segment Editor effect.

The choice, the server's URL, its token and an optional CA certificate (a self-signed server)
are kept in Slicer's settings (``qt.QSettings``, keys ``OFLSAM2/Compute*``), shared by the
module and the effect; outside the Slicer application (tests, PythonSlicer scripts) in memory.
The token is never logged and never shown in a ``repr``. No Qt import here but in the settings
store, no torch anywhere: a server run needs nothing beyond Slicer's own Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import slicer

from oflsam2.client import ServerError, ServerTarget, test_connection

LOCAL, SERVER = "local", "server"
MODES = {LOCAL: "this computer", SERVER: "a server"}
KEYS = {"mode": "OFLSAM2/ComputeOn", "url": "OFLSAM2/ComputeServerURL", "token": "OFLSAM2/ComputeServerToken",
        "ca_file": "OFLSAM2/ComputeServerCAFile"}


@dataclass
class ComputeSettings:
    mode: str = LOCAL
    url: str = ""
    token: str = field(default="", repr=False)
    ca_file: str = ""

    @property
    def remote(self) -> bool:
        return self.mode == SERVER

    def target(self) -> ServerTarget | None:
        """The server to run on, or None for this computer; an incomplete server choice is refused."""
        if not self.remote:
            return None
        if not self.url.strip() or not self.token.strip():
            raise ServerError("Compute on a server needs the server's URL and its token: fill them in under "
                              "'Compute on' (the token is in the file the server named when it started).")
        return ServerTarget(self.url.strip(), self.token.strip(), self.ca_file.strip() or None)


class MemorySettings:
    """``qt.QSettings``' ``value``/``setValue``, in memory (outside the Slicer application)."""

    def __init__(self):
        self.values: dict = {}

    def value(self, key, default=None):
        return self.values.get(key, default)

    def setValue(self, key, value) -> None:
        self.values[key] = value


_memory = MemorySettings()


def settings_store():
    """Slicer's settings inside the application, else the in-memory store."""
    if hasattr(slicer, "app"):
        import qt

        return qt.QSettings()
    return _memory


def load(store=None) -> ComputeSettings:
    store = store or settings_store()
    values = {name: str(store.value(key, "") or "") for name, key in KEYS.items()}
    values["mode"] = values["mode"] if values["mode"] in MODES else LOCAL
    return ComputeSettings(**values)


def save(settings: ComputeSettings, store=None) -> None:
    store = store or settings_store()
    for name, key in KEYS.items():
        store.setValue(key, getattr(settings, name))


def check_connection(settings: ComputeSettings) -> str:
    """"Test connection": what to show the user; raises :class:`ServerError` saying what is wrong."""
    target = settings.target()
    if target is None:
        raise ServerError("Choose 'a server' under 'Compute on' first.")
    return test_connection(target)
