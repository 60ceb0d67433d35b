"""Slicer side of OFLSAM2: worker process client, MRML bridge, run logic, installs and the
module panel (the editor effect has a folder of its own, ``SegmentEditorOFLSAM2Lib``).

``worker``, ``options`` and ``progress`` import neither ``slicer`` nor ``qt``; the ``mrml_*``
bridge, ``run``, ``run_plan`` and ``logic*`` import ``slicer``/``vtk`` (they run under the
``slicer-core`` wheel) but not ``qt``; ``module_logic`` and ``widget`` (the panel) need the Slicer
application.
"""
