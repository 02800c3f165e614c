"""Tests of the VLM answer contract (answer.py): lenient parsing, strict validation, reasons.

    python -m unittest discover -s models/vlm-reference -p 'test_*.py'
"""

from __future__ import annotations

import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from answer import first_json, validate  # noqa: E402

CATEGORIES = ["hand", "face", "object"]
TOOLS = ["onnx-inpaint", "patchmatch"]


def check(text: str, **kw):
    args = dict(categories=CATEGORIES, tools=TOOLS, allow_tool=True, max_regions=16, coordinates="input",
                image_w=200, image_h=100, resized_w=196, resized_h=84)
    args.update(kw)
    return validate(text, **args)


HAND = '{"bbox_2d":[10,20,30,40],"category":"hand","instruction":"Fix it."}'


class LenientParse(unittest.TestCase):
    def test_plain_list(self):
        a = check(f"[{HAND}]")
        self.assertIsNone(a.error)
        self.assertEqual([r.bbox for r in a.regions], [[10, 20, 30, 40]])
        self.assertEqual(a.regions[0].instruction, "Fix it.")
        self.assertEqual(a.regions[0].notes, [])

    def test_code_fence_with_info_string_and_trailing_text(self):
        a = check(f"Sure!\n```json\n[{HAND}]\n```\nAnything else?")
        self.assertEqual(len(a.regions), 1)

    def test_unclosed_fence_reads_to_the_end(self):
        self.assertEqual(len(check(f"```\n[{HAND}]").regions), 1)

    def test_fence_without_newline(self):
        self.assertEqual(len(check(f"```[{HAND}]```").regions), 1)

    def test_prose_before_and_after(self):
        a = check(f"The regions are: [{HAND}] and that is all. [1]")
        self.assertEqual(len(a.regions), 1)

    def test_single_object_is_a_list_of_one(self):
        self.assertEqual(len(check(HAND).regions), 1)

    def test_empty_list(self):
        a = check("[]")
        self.assertEqual((a.error, a.regions, a.dropped), (None, [], []))

    def test_no_json(self):
        self.assertEqual(check("Nothing is wrong with this image.").error, "no_json")
        self.assertEqual(check("context error").error, "no_json")

    def test_invalid_json_at_the_first_bracket(self):
        self.assertEqual(check(f"[{HAND}").error, "invalid_json")          # truncated
        self.assertEqual(check(f"[{HAND},]").error, "invalid_json")        # trailing comma
        self.assertEqual(check("[{'bbox_2d': [1,2,3,4]}]").error, "invalid_json")
        self.assertEqual(check('[{"bbox_2d":[NaN,1,2,3]}]').error, "invalid_json")
        self.assertEqual(check('[{"bbox_2d":[1e400,1,2,3]}]').error, "invalid_json")
        self.assertEqual(check("[" * 65 + "]" * 65).error, "invalid_json")
        self.assertIsNone(check("[" * 64 + "]" * 64).error)

    def test_first_json_takes_the_first_bracket_only(self):
        self.assertEqual(first_json("see [x] then [1]"), (None, "invalid_json"))
        self.assertEqual(first_json('x {"a":1} [2]'), ({"a": 1}, None))


class StrictValidation(unittest.TestCase):
    def reasons(self, a):
        return [d["reason"] for d in a.dropped]

    def test_unknown_category_dropped(self):
        a = check('[{"bbox_2d":[1,2,3,4],"category":"dragon","instruction":"x"},' + HAND + "]")
        self.assertEqual([r.category for r in a.regions], ["hand"])
        self.assertEqual(a.dropped, [{"index": 0, "reason": "unknown_category"}])

    def test_category_is_case_sensitive(self):
        self.assertEqual(self.reasons(check('[{"bbox_2d":[1,2,3,4],"category":"Hand","instruction":"x"}]')),
                         ["unknown_category"])

    def test_bad_elements(self):
        a = check('[1, {"category":"hand","instruction":"x"}, {"bbox_2d":[1,2,3],"category":"hand","instruction":"x"},'
                  '{"bbox_2d":[1,2,3,true],"category":"hand","instruction":"x"},'
                  '{"bbox_2d":[1,2,3,4],"instruction":"x"}, {"bbox_2d":[1,2,3,4],"category":"hand"},'
                  '{"bbox_2d":[1,2,3,4],"category":"hand","instruction":7}]')
        self.assertEqual(self.reasons(a), ["not_object", "bad_bbox", "bad_bbox", "bad_bbox", "missing_category",
                                           "missing_instruction", "missing_instruction"])
        self.assertEqual([d["index"] for d in a.dropped], [0, 1, 2, 3, 4, 5, 6])

    def test_box_clipped_to_the_image(self):
        a = check('[{"bbox_2d":[-5,90,250,130],"category":"face","instruction":"x"}]')
        self.assertEqual(a.regions[0].bbox, [0, 90, 200, 100])
        self.assertEqual(a.regions[0].notes, ["clipped"])

    def test_box_outside_the_image_dropped(self):
        a = check('[{"bbox_2d":[210,10,250,20],"category":"face","instruction":"x"}]')
        self.assertEqual(self.reasons(a), ["outside_image"])

    def test_empty_or_reversed_box_dropped(self):
        a = check('[{"bbox_2d":[30,10,30,20],"category":"face","instruction":"x"},'
                  '{"bbox_2d":[40,10,30,20],"category":"face","instruction":"x"}]')
        self.assertEqual(self.reasons(a), ["empty_box", "empty_box"])

    def test_float_boxes_floor_and_ceil(self):
        a = check('[{"bbox_2d":[10.7,20.2,30.1,40.0],"category":"hand","instruction":"x"}]')
        self.assertEqual(a.regions[0].bbox, [10, 20, 31, 40])

    def test_tools(self):
        a = check('[{"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":"patchmatch"},'
                  '{"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":"airbrush"},'
                  '{"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":3}]')
        self.assertEqual([(r.tool, r.notes) for r in a.regions],
                         [("patchmatch", []), (None, ["unknown_tool"]), (None, ["unknown_tool"])])
        a = check('[{"bbox_2d":[1,2,3,4],"category":"hand","instruction":"x","tool":"patchmatch"}]', allow_tool=False)
        self.assertEqual((a.regions[0].tool, a.regions[0].notes), (None, ["tool_not_allowed"]))

    def test_max_regions(self):
        a = check("[" + ",".join([HAND] * 5) + "]", max_regions=3)
        self.assertEqual(len(a.regions), 3)
        self.assertEqual(a.dropped, [{"index": 3, "reason": "over_max_regions"},
                                     {"index": 4, "reason": "over_max_regions"}])

    def test_coordinate_spaces(self):
        box = '[{"bbox_2d":[98,42,196,84],"category":"hand","instruction":"x"}]'
        self.assertEqual(check(box, coordinates="resized").regions[0].bbox, [100, 50, 200, 100])
        box = '[{"bbox_2d":[0,0,333,500],"category":"hand","instruction":"x"}]'
        # 333 * 200 / 1000 = 66.6 -> ceil 67
        self.assertEqual(check(box, coordinates="norm1000").regions[0].bbox, [0, 0, 67, 50])

    def test_duplicate_keys_keep_the_last(self):
        a = check('[{"bbox_2d":[1,2,3,4],"category":"dragon","category":"face","instruction":"x"}]')
        self.assertEqual(a.regions[0].category, "face")


if __name__ == "__main__":
    unittest.main()
