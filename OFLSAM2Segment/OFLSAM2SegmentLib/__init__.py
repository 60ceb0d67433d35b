"""Slicer side of OFLSAM2: worker thread, MRML bridge, run logic, installs and the editor effect.

``worker``, ``options`` and ``progress`` import neither ``slicer`` nor ``qt``; ``mrml_io`` and
``logic`` import ``slicer``/``vtk`` (they run under the ``slicer-core`` wheel) but not ``qt``.
"""
