#!/usr/bin/env python3
"""Markdown tables of `retoucher eval` reports side by side, as in the README's Quality section.

    python3 scripts/quality-table.py NAME=REPORT.json [NAME=REPORT.json ...]

Each argument names a bundle and its report.json. Prints two tables (localisation; restoration
and harm), overall and per class, one column per bundle for each figure, then a line per bundle
on the loop. Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.2f} %"


def rows(report: dict) -> list[tuple[str, dict]]:
    """Overall, then the defect classes, then the defect-free ones (`none`, `intended`)."""
    classes = sorted(report["per_class"].items(),
                     key=lambda kv: (kv[1]["localisation"]["defect_images"] == 0, kv[0]))
    return [("**all**", report)] + classes


def main() -> None:
    bundles: list[tuple[str, dict]] = []
    for arg in sys.argv[1:]:
        name, sep, path = arg.partition("=")
        if not sep:
            sys.exit(f"quality-table.py: expected NAME=REPORT.json, got {arg!r}")
        bundles.append((name, json.loads(Path(path).read_text())))
    if not bundles:
        sys.exit(__doc__)
    names = [n for n, _ in bundles]
    classes = [c for c, _ in rows(bundles[0][1])]

    def figure(bundle: dict, cls: str) -> dict:
        return bundle if cls == "**all**" else bundle["per_class"].get(cls, {})

    def columns(label: str) -> list[str]:
        return [f"{label} {n}" for n in names]

    head = ["class", "images"] + columns("AUC") + columns("IoU") + columns("recall") + columns("FP area")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cls in classes:
        figs = [figure(b, cls) for _, b in bundles]
        loc = [f.get("localisation", {}) for f in figs]
        cells = [cls, str(figs[0].get("images", "–"))]
        cells += [fmt(x.get("auc")) for x in loc]
        cells += [fmt(x.get("iou")) for x in loc]
        cells += [fmt(x.get("recall")) for x in loc]
        cells += [pct(x.get("false_positive_area")) for x in loc]
        print("| " + " | ".join(cells) + " |")
    print()

    head = (["class", "PSNR before"] + columns("PSNR after") + ["SSIM before"] + columns("SSIM after")
            + columns("worse") + ["changed outside"])
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cls in classes:
        figs = [figure(b, cls) for _, b in bundles]
        res = [f.get("restoration", {}) for f in figs]
        harm = [f.get("harm", {}) for f in figs]
        cells = [cls, fmt(res[0].get("psnr_in_mask_before"), 2)]
        cells += [fmt(r.get("psnr_in_mask_after"), 2) for r in res]
        cells += [fmt(res[0].get("ssim_in_mask_before"))]
        cells += [fmt(r.get("ssim_in_mask_after")) for r in res]
        cells += [pct(h.get("worse_share")) for h in harm]
        cells += [" / ".join(str(h.get("outside_mask_changed_pixels", "–")) for h in harm)]
        print("| " + " | ".join(cells) + " |")
    print()
    for name, report in bundles:
        loop = report["loop"]
        ms = loop["stage_ms"]
        loc = report["localisation"]
        print(f"- {name}: τ = {loc['threshold']}, {report['images']} images, "
              f"{loop['mean_iterations']:.2f} repair iterations per image, "
              f"{loop['clean_share'] * 100:.1f} % left clean, "
              f"{ms['total']:.0f} ms per image (perception {ms['perception']:.0f}, "
              f"reasoning {ms['reasoning']:.0f}, action {ms['action']:.0f}), "
              f"{report['failed']} not evaluated.")


if __name__ == "__main__":
    main()
