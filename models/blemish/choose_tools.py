"""Choose the blemish bundle's repair-tool routing from two `retoucher eval` reports (validation split).

    python3 models/blemish/choose_tools.py PUSHPULL/report.json PATCHMATCH/report.json [CHOSEN/report.json]

PUSHPULL is a run with every region sent to `onnx-inpaint` (default_tool = "onnx-inpaint", no
[action.routing]), PATCHMATCH one with every region sent to `patchmatch`, both over the
validation manifest (models/quality/generate.py --splits val). Rule: each class goes to the tool
with the higher mean PSNR in the ground-truth mask after repair
(per_class.<class>.restoration.psnr_in_mask_after); a difference below 0.05 dB is a tie and goes
to the default tool; the default tool is the one that wins the most classes (push-pull on a
draw). Prints the README's table (PSNR, SSIM in brackets; CHOSEN adds the chosen routing's
column) and the [action] lines for bundle.toml. Standard library only.
"""
import json
import sys

CLASSES = ["warp", "patch", "melt", "blotch", "blur", "noise", "stretch", "text"]
TOOLS = ("onnx-inpaint", "patchmatch")
TIE_DB = 0.05


def restoration(report: dict, cls: str | None) -> dict:
    return report["restoration"] if cls is None else report["per_class"][cls]["restoration"]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    reports = [json.load(open(p)) for p in argv]
    pp, pm = reports[0], reports[1]

    winners = {}
    for c in CLASSES:
        d = restoration(pp, c)["psnr_in_mask_after"] - restoration(pm, c)["psnr_in_mask_after"]
        winners[c] = None if abs(d) < TIE_DB else TOOLS[0] if d > 0 else TOOLS[1]
    wins = {t: sum(w == t for w in winners.values()) for t in TOOLS}
    default = TOOLS[1] if wins[TOOLS[1]] > wins[TOOLS[0]] else TOOLS[0]
    routing = {c: w for c, w in winners.items() if w is not None and w != default}

    head = ["class", "images", "before", "all push-pull", "all PatchMatch"]
    if len(reports) == 3:
        head.append("chosen routing")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in CLASSES + [None]:
        r0 = restoration(pp, c)
        cells = [c or "all", str(r0["images"]),
                 f"{r0['psnr_in_mask_before']:.2f} ({r0['ssim_in_mask_before']:.3f})"]
        for i, rep in enumerate(reports):
            r = restoration(rep, c)
            v = f"{r['psnr_in_mask_after']:.2f}"
            if c is not None and i < 2 and winners[c] == TOOLS[i]:
                v = f"**{v}**"
            cells.append(f"{v} ({r['ssim_in_mask_after']:.3f})")
        print("| " + " | ".join(cells) + " |")

    print()
    for c in CLASSES:
        d = restoration(pp, c)["psnr_in_mask_after"] - restoration(pm, c)["psnr_in_mask_after"]
        print(f"# {c}: push-pull - PatchMatch = {d:+.3f} dB -> {winners[c] or 'tie'}")
    print("[action]")
    print(f'default_tool = "{default}"')
    if routing:
        print()
        print("[action.routing]")
        for c, t in routing.items():
            print(f'{c} = "{t}"')
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
