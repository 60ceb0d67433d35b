"""Which Slicer can run OFLSAM2: the minimum version, checked when the module loads.

Slicer 5.8 and older ship Python 3.9, where ``sam2`` (Python >= 3.10, torch >= 2.5.1) cannot be
installed, and lack ``vtkSlicerSegmentEditorLogic`` (the editor writes and undo of a run); 5.10
ships Python 3.12 and has it. The extension metadata declare the same minimum
(``CMakeLists.txt``: ``find_package(Slicer <minimum>)``). On an older Slicer the module still
loads (its files stay importable by Python 3.9) and says which version it needs, instead of
failing at start-up with a Python error.
"""

from __future__ import annotations

import sys

MINIMUM_SLICER_VERSION = (5, 10)
MINIMUM_PYTHON = (3, 10)  # sam2's own floor


def slicer_version(app) -> tuple | None:
    """``(major, minor)`` of the running Slicer (``qSlicerCoreApplication`` properties), or None
    outside Slicer."""
    try:
        return int(app.majorVersion), int(app.minorVersion)
    except (AttributeError, TypeError, ValueError):
        return None


def unsupported_slicer_reason(app=None, python=None) -> str | None:
    """Why this Slicer cannot run OFLSAM2 (what to install instead), or None when it can.
    ``app``: ``slicer.app`` (None: taken from ``slicer`` when it has one); ``python``:
    ``sys.version_info``."""
    if app is None:
        import slicer

        app = getattr(slicer, "app", None)
    version = slicer_version(app)
    python = tuple((python or sys.version_info)[:2])
    minimum = "{}.{}".format(*MINIMUM_SLICER_VERSION)
    if version is not None and version < MINIMUM_SLICER_VERSION:
        running = "this is Slicer {}.{} (Python {}.{})".format(*version, *python)
    elif python < MINIMUM_PYTHON:
        running = "this Slicer's Python is {}.{}".format(*python)
    else:
        return None
    return (f"OFLSAM2 needs 3D Slicer {minimum} or later; {running}. SAM2 needs Python "
            f"{MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or later, which Slicer ships from {minimum} on, and the run's undo "
            "needs the Segment Editor logic added in the same version. Install the current Slicer from "
            "https://download.slicer.org, then OFLSAM2 from its Extensions Manager.")
