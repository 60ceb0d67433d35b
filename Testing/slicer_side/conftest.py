"""Fixtures for the Slicer-side tests: real MRML classes from the ``slicer-core`` wheel.

The MRML fixtures skip cleanly when ``slicer-core`` is not installed; the worker, option and
packaging tests run without it. Helpers live in ``mrml_helpers.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "OFLSAM2Segment"
if str(MODULE_DIR) not in sys.path:  # OFLSAM2SegmentLib lives beside the oflsam2 package
    sys.path.insert(0, str(MODULE_DIR))

from mrml_helpers import require_slicer  # noqa: E402


@pytest.fixture(scope="session")
def slicer_core():
    slicer = require_slicer()
    # Without these rules AddEmptySegment() silently returns '' (slicer.md section 6).
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())
    return slicer


@pytest.fixture
def scene(slicer_core):
    scene = slicer_core.vtkMRMLScene()
    yield scene
    scene.Clear(1)


@pytest.fixture(params=["plain Python", "PythonSlicer launcher"])
def worker_python(request, tmp_path_factory):
    """How the worker is started: ``worker_python(interpreter=None)`` gives the ``python``
    argument of ``Worker``. Plain: the interpreter itself (None: this Python). Launcher: a
    ``PythonSlicer`` stand-in (``app_launcher``, written from CTKAppLauncher's source) whose
    ``python-real`` is that interpreter, as ``sys.executable`` is in Slicer."""
    if request.param == "plain Python":
        def plain(interpreter=None):
            return interpreter

        plain.launcher = False
        return plain

    def through_launcher(interpreter=None):
        from app_launcher import install

        return install(tmp_path_factory.mktemp("Slicer 5.10"), interpreter or sys.executable)

    through_launcher.launcher = True
    return through_launcher
