"""The VLM answer contract: lenient parsing of the generated text, strict validation of regions.

Reference semantics for the worker's parser (models/README.md, "Answer parsing and validation"):

1. Lenient parse. If the text contains a code fence (```), only the first fenced block is read:
   it starts after the fence and, when the rest of the fence line is an info string
   ([A-Za-z0-9_-]* and blanks, e.g. "json"), after that line's newline; it ends at the next ```
   or at the end of the text. In that text the JSON value that starts at the first '[' or '{'
   is read; anything after it is ignored. An object is read as a list of one region. JSON is
   RFC 8259: no NaN/Infinity, no control characters in strings; a number that overflows a
   double and nesting deeper than 64 arrays/objects are errors. The answer is malformed when there is no '[' or '{' (`error` =
   "no_json") or the value there does not parse (`error` = "invalid_json").
2. Strict validation, element by element, in order. A kept region has a box in input-image
   pixels, a category of the taxonomy, an instruction and an optional tool; every dropped
   element and every change has a reason code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

FENCE = "```"
MAX_DEPTH = 64
INFO_STRING = re.compile(r"[A-Za-z0-9_\-]*[ \t]*\r?\n")

# Coordinate spaces of bbox_2d (bundle key reasoning.vlm.bbox_coordinates)
COORDINATES = ("input", "resized", "norm1000")


@dataclass
class Region:
    bbox: list[int]                      # [x1, y1, x2, y2] in input-image pixels, x2/y2 exclusive
    category: str
    instruction: str
    tool: str | None
    notes: list[str] = field(default_factory=list)   # reason codes of changes (clipped, unknown_tool, ...)


@dataclass
class Answer:
    error: str | None                    # None, "no_json" or "invalid_json" (malformed answer)
    regions: list[Region]
    dropped: list[dict]                  # {"index": i, "reason": code}

    def to_json(self) -> dict:
        return {"error": self.error,
                "regions": [{"bbox": r.bbox, "category": r.category, "instruction": r.instruction,
                             "tool": r.tool, "notes": r.notes} for r in self.regions],
                "dropped": self.dropped}


def _parse_float(s: str) -> float:
    v = float(s)
    if math.isinf(v):
        raise ValueError(f"number out of range: {s}")
    return v


def _parse_int(s: str):
    v = int(s)
    if -(2 ** 63) <= v < 2 ** 64:
        return v
    return _parse_float(s)    # as serde_json: integers beyond 64 bits are read as doubles


def _reject_constant(name: str):
    raise ValueError(f"not JSON: {name}")


_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_int=_parse_int, parse_constant=_reject_constant)


def fenced_block(text: str) -> str:
    start = text.find(FENCE)
    if start < 0:
        return text
    body = start + len(FENCE)
    info = INFO_STRING.match(text, body)
    if info:
        body = info.end()
    end = text.find(FENCE, body)
    return text[body:] if end < 0 else text[body:end]


def first_json(text: str):
    """(value, None) for the JSON value at the first '[' or '{', else (None, error code)."""
    block = fenced_block(text)
    starts = [p for p in (block.find("["), block.find("{")) if p >= 0]
    if not starts:
        return None, "no_json"
    try:
        value, _ = _DECODER.raw_decode(block, min(starts))
    except (ValueError, RecursionError):
        return None, "invalid_json"
    if _depth(value) > MAX_DEPTH:
        return None, "invalid_json"
    return value, None


def _depth(value) -> int:
    """Nesting depth of arrays/objects (a scalar is 0, [] is 1)."""
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def to_input_pixels(box: list[float], coordinates: str, image_w: int, image_h: int,
                    resized_w: int, resized_h: int) -> list[int]:
    """[x1,y1,x2,y2] in the answer's coordinate space -> input pixels (x1,y1 floor, x2,y2 ceil)."""
    space_w, space_h = {"input": (image_w, image_h), "resized": (resized_w, resized_h),
                        "norm1000": (1000, 1000)}[coordinates]
    x1, y1, x2, y2 = (float(v) for v in box)
    return [math.floor(x1 * image_w / space_w), math.floor(y1 * image_h / space_h),
            math.ceil(x2 * image_w / space_w), math.ceil(y2 * image_h / space_h)]


def validate(text: str, *, categories: list[str], tools: list[str], allow_tool: bool, max_regions: int,
             coordinates: str, image_w: int, image_h: int, resized_w: int, resized_h: int) -> Answer:
    value, error = first_json(text)
    if error is not None:
        return Answer(error, [], [])
    items = [value] if isinstance(value, dict) else value
    regions: list[Region] = []
    dropped: list[dict] = []

    def drop(i: int, reason: str) -> None:
        dropped.append({"index": i, "reason": reason})

    for i, item in enumerate(items):
        if not isinstance(item, dict):
            drop(i, "not_object")
            continue
        box = item.get("bbox_2d")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            drop(i, "bad_bbox")
            continue
        category = item.get("category")
        if not isinstance(category, str):
            drop(i, "missing_category")
            continue
        if category not in categories:
            drop(i, "unknown_category")
            continue
        instruction = item.get("instruction")
        if not isinstance(instruction, str):
            drop(i, "missing_instruction")
            continue
        notes: list[str] = []
        tool = None
        if "tool" in item:
            if not allow_tool:
                notes.append("tool_not_allowed")
            elif isinstance(item["tool"], str) and item["tool"] in tools:
                tool = item["tool"]
            else:
                notes.append("unknown_tool")
        x1, y1, x2, y2 = to_input_pixels(box, coordinates, image_w, image_h, resized_w, resized_h)
        if x2 <= x1 or y2 <= y1:
            drop(i, "empty_box")
            continue
        clipped = [min(max(x1, 0), image_w), min(max(y1, 0), image_h),
                   min(max(x2, 0), image_w), min(max(y2, 0), image_h)]
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            drop(i, "outside_image")
            continue
        if clipped != [x1, y1, x2, y2]:
            notes.append("clipped")
        if len(regions) >= max_regions:
            drop(i, "over_max_regions")
            continue
        regions.append(Region(clipped, category, instruction, tool, notes))
    return Answer(None, regions, dropped)
