"""Slicer side of OFLSAM2: worker process client, MRML bridge, run logic, installs and the
module panel (the editor effect has a folder of its own, ``SegmentEditorOFLSAM2Lib``).

``worker``, ``options`` and ``progress`` import neither ``slicer`` nor ``qt``; ``mrml_io`` and
``logic`` import ``slicer``/``vtk`` (they run under the ``slicer-core`` wheel) but not ``qt``;
``widget`` (the panel) needs the Slicer application.
"""
