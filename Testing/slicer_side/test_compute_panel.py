""""Compute on: this computer | a server" (module panel and effect): the choice is saved at once
and shared, the server's fields show only for a server, "Test connection" says what it found
(against a real server on 127.0.0.1). Qt cannot run here: the few widgets the panel uses are
small fakes that keep their values and signal connections, as in the effect's review test."""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import pytest
from mrml_helpers import require_slicer

slicer = require_slicer()
pytestmark = pytest.mark.slicer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/: the server helpers
from server_helpers import InProcessServer  # noqa: E402

from OFLSAM2SegmentLib import compute  # noqa: E402


class FakeWidget:
    def __init__(self, *args):
        self.slots, self.visible, self.text, self.currentIndex, self.items = {}, True, "", 0, []

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot):
        self.slots[signal].remove(slot)

    def emit(self, signal, *args):
        for slot in list(self.slots.get(signal, [])):
            slot(*args)

    def addItem(self, text, data):
        self.items.append((text, data))

    def blockSignals(self, blocked):
        return False

    def setVisible(self, visible):
        self.visible = bool(visible)

    def addRow(self, *widgets):
        pass

    def setContentsMargins(self, *margins):
        pass


@pytest.fixture
def panel_class(monkeypatch):
    qt = types.SimpleNamespace(QComboBox=FakeWidget, QLineEdit=FakeWidget, QPushButton=FakeWidget, QLabel=FakeWidget,
                               QWidget=FakeWidget, QFormLayout=FakeWidget)
    qt.QLineEdit.Password = 2
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext, raising=False)
    from OFLSAM2SegmentLib.compute_view import ComputePanel

    compute.save(compute.ComputeSettings())
    yield ComputePanel
    compute.save(compute.ComputeSettings())


def test_the_choice_is_saved_shared_and_tested(panel_class, tmp_path):
    rows = []
    module = panel_class(lambda label, widget: rows.append(label))
    assert rows == ["Compute on:", ""]
    assert [text for text, _ in module.modeComboBox.items] == ["this computer", "a server"]
    assert not module.serverBox.visible  # this computer: no server fields
    assert module.tokenLineEdit.echoMode == 2  # the token shows as dots

    with InProcessServer(state_dir=str(tmp_path)) as server:
        module.modeComboBox.currentIndex = 1
        module.modeComboBox.emit("currentIndexChanged(int)", 1)
        assert module.serverBox.visible and compute.load().mode == compute.SERVER
        module.urlLineEdit.text, module.tokenLineEdit.text = server.url, server.token
        module.tokenLineEdit.emit("editingFinished()")
        saved = compute.load()
        assert (saved.url, saved.token) == (server.url, server.token) and saved.target().url == server.url

        module.testButton.emit("clicked()")
        assert module.statusLabel.text.startswith("Connected to OFLSAM2") and "token was accepted" in module.statusLabel.text

        effect = panel_class(lambda label, widget: None)  # the effect shows what the module saved
        assert effect.modeComboBox.currentIndex == 1 and effect.serverBox.visible
        assert (effect.urlLineEdit.text, effect.tokenLineEdit.text) == (server.url, server.token)

        effect.tokenLineEdit.text = "a-wrong-token"
        effect.testButton.emit("clicked()")
        assert effect.statusLabel.text.startswith("Not connected:") and "refused the token" in effect.statusLabel.text
        assert "a-wrong-token" not in effect.statusLabel.text
        module.refresh()
        assert module.tokenLineEdit.text == "a-wrong-token"  # one setting for both

    module.modeComboBox.currentIndex = 0
    module.modeComboBox.emit("currentIndexChanged(int)", 0)
    assert not module.serverBox.visible and compute.load().target() is None
    module.disconnect()
    assert not any(module.modeComboBox.slots.values())
