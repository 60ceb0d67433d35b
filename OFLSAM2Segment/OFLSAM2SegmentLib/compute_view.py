"""The "Compute on: this computer | a server" controls, shared by the module panel and the
Segment Editor effect: the server's URL, its token (shown as dots), an optional CA certificate
for a self-signed server, "Test connection" and what the test found.

Every change is saved at once in Slicer's settings (:mod:`.compute`), so the module and the
effect always agree and the next run uses it; the logic reads the settings when a run starts.
"""

from __future__ import annotations

from typing import Callable

from . import compute


class ComputePanel:
    """``add_row(label, widget)`` places each row (``QFormLayout.addRow`` in the module,
    ``addLabeledOptionsWidget`` in the effect)."""

    def __init__(self, add_row: Callable[[str, object], None]):
        import qt

        self.modeComboBox = qt.QComboBox()
        for key, text in compute.MODES.items():
            self.modeComboBox.addItem(text, key)
        self.modeComboBox.toolTip = ("This computer: the model runs here (needs PyTorch; a GPU helps). A server: "
                                     "'oflsam2 serve' on a GPU computer segments; nothing heavy is installed here.")
        self.serverBox = qt.QWidget()
        form = qt.QFormLayout(self.serverBox)
        form.setContentsMargins(0, 0, 0, 0)
        self.urlLineEdit = qt.QLineEdit()
        self.urlLineEdit.placeholderText = "https://gpu-box:8765"
        self.tokenLineEdit = qt.QLineEdit()
        self.tokenLineEdit.echoMode = qt.QLineEdit.Password
        self.tokenLineEdit.placeholderText = "the token the server keeps in its token file"
        self.caLineEdit = qt.QLineEdit()
        self.caLineEdit.placeholderText = "optional: CA certificate (.pem) of a self-signed server"
        self.testButton = qt.QPushButton("Test connection")
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        form.addRow("Server URL:", self.urlLineEdit)
        form.addRow("Token:", self.tokenLineEdit)
        form.addRow("CA certificate:", self.caLineEdit)
        form.addRow(self.testButton)
        form.addRow(self.statusLabel)
        add_row("Compute on:", self.modeComboBox)
        add_row("", self.serverBox)
        self.refresh()
        self.modeComboBox.connect("currentIndexChanged(int)", self.onChanged)
        for edit in (self.urlLineEdit, self.tokenLineEdit, self.caLineEdit):
            edit.connect("editingFinished()", self.onChanged)
        self.testButton.connect("clicked()", self.onTest)

    def settings(self) -> compute.ComputeSettings:
        mode = list(compute.MODES)[self.modeComboBox.currentIndex]
        return compute.ComputeSettings(mode, self.urlLineEdit.text, self.tokenLineEdit.text, self.caLineEdit.text)

    def refresh(self) -> None:
        """Show the saved choice (the other panel may have changed it)."""
        saved = compute.load()
        wasBlocked = self.modeComboBox.blockSignals(True)
        self.modeComboBox.currentIndex = list(compute.MODES).index(saved.mode)  # the items' order
        self.modeComboBox.blockSignals(wasBlocked)
        self.urlLineEdit.text, self.tokenLineEdit.text, self.caLineEdit.text = saved.url, saved.token, saved.ca_file
        self.serverBox.setVisible(saved.remote)

    def onChanged(self, *args) -> None:
        settings = self.settings()
        compute.save(settings)
        self.serverBox.setVisible(settings.remote)
        self.statusLabel.text = ""

    def onTest(self) -> None:
        self.onChanged()
        import slicer

        with slicer.util.WaitCursor():
            try:
                self.statusLabel.text = compute.check_connection(self.settings())
            except Exception as exc:  # the reason is the message; the token is never part of it
                self.statusLabel.text = f"Not connected: {exc}"

    def disconnect(self) -> None:
        self.modeComboBox.disconnect("currentIndexChanged(int)", self.onChanged)
        for edit in (self.urlLineEdit, self.tokenLineEdit, self.caLineEdit):
            edit.disconnect("editingFinished()", self.onChanged)
        self.testButton.disconnect("clicked()", self.onTest)
