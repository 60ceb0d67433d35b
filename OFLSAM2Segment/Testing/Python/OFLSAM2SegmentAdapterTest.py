"""Inside Slicer: train an OFL-SAM2 adapter on annotated slices, save it, and segment a second
volume without any annotation (random-weight SAM2 at 256 px, so nothing is downloaded)."""

import os
import tempfile
import unittest

import slicer

RUN = {"randomWeights": True, "imageSize": 256, "device": "cpu", "epochs": 1}


class OFLSAM2SegmentAdapterTest(unittest.TestCase):
    def setUp(self):
        from OFLSAM2SegmentLib.testing import engine_missing_reason

        reason = engine_missing_reason()  # e.g. on the extension build machines
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear()

    def test_save_adapter_then_segment_a_cohort(self):
        from OFLSAM2Segment import OFLSAM2SegmentLogic
        from OFLSAM2SegmentLib.testing import make_annotated_volume, segment_arrays

        volume, segmentation, ids = make_annotated_volume(slicer.mrmlScene)
        before = segment_arrays(segmentation, volume)
        logic = OFLSAM2SegmentLogic()
        with tempfile.TemporaryDirectory() as adapter:
            summary = logic.saveAdapter(volume, segmentation, adapter, ids[:1], **RUN)
            self.assertEqual(summary["method"], "ofl")
            self.assertTrue(os.path.isfile(os.path.join(adapter, "Target.json")), "no adapter was saved")
            after = segment_arrays(segmentation, volume)
            self.assertTrue((after[ids[1]] == before[ids[1]]).all(), "training changed another segment")

            cohort, _, _ = make_annotated_volume(slicer.mrmlScene)
            created = logic.segmentVolumesWithAdapter([cohort], adapter, **RUN)

        self.assertEqual(len(created), 1)
        names = [created[0].GetSegmentation().GetNthSegment(i).GetName()
                 for i in range(created[0].GetSegmentation().GetNumberOfSegments())]
        self.assertEqual(names, ["Target"])
        self.assertFalse(logic.isRunning())
