"""The "OFL-SAM2" Segment Editor effect, in a folder of its own.

Slicer's ``qSlicerSegmentEditorScriptedEffect.setPythonSource`` names the effect's Python module
after this folder and, when ``sys.modules`` has no such module holding the effect class, executes
``SegmentEditorEffect.py`` as a plain module under that name. Nothing else may import this
folder as a package, and the effect file must use absolute imports only.
"""

from .SegmentEditorEffect import *  # noqa: F401,F403
