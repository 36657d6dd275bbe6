"""Judge a fast run against a reference run of the same jobs: PSNR, SSIM, latent error, motion, speed-up.

    python launch/compare.py outputs/exact outputs/fastest                  # -> outputs/fastest/compare/
    python launch/compare.py outputs/exact outputs/fastest --out report --frame-stride 4 --tile-width 192
    python launch/compare.py outputs/exact outputs/draft --aesthetic-clip weights/clip-vit-large-patch14
        --aesthetic-head weights/OpenS2V-Weight/aesthetic-model.pth      # (one line) + the aesthetic score

Writes compare.json, compare.md and contact_sheet.png (bindweave/quality/compare.py says what they
hold) and prints the markdown table. Exit code 0: every sample finished in both folders was
compared; 1: some could not be (their errors are in the report); 2: bad input (a missing folder,
no sample in common), one `error:` line and nothing written.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bindweave.errors import BindWeaveInputError  # noqa: E402
from bindweave.quality.compare import MARKDOWN_NAME, compare_runs, write_comparison  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference_dir", type=Path, help="the run compared against (e.g. outputs/exact)")
    parser.add_argument("candidate_dir", type=Path, help="the run judged (e.g. outputs/fastest)")
    parser.add_argument("--out", type=Path, help="the report folder (default: CANDIDATE_DIR/compare)")
    parser.add_argument("--frame-stride", type=int, default=1, metavar="K",
                        help="SSIM of every K-th frame (default 1: every frame; PSNR always uses all)")
    parser.add_argument("--tile-width", type=int, default=256, metavar="PX",
                        help="width of each contact-sheet tile in pixels (default 256)")
    parser.add_argument("--aesthetic-clip", type=Path, metavar="DIR",
                        help="local openai/clip-vit-large-patch14 folder: score each video's aesthetics (with "
                             "--aesthetic-head)")
    parser.add_argument("--aesthetic-head", type=Path, metavar="FILE",
                        help="the LAION aesthetic predictor's weights (OpenS2V-Weight's aesthetic-model.pth)")
    parser.add_argument("--device", default=None, help="where the aesthetic scorer runs (default: cuda if present)")
    return parser.parse_args(argv)


def aesthetic_scorer(args: argparse.Namespace):
    """The scorer of --aesthetic-clip/--aesthetic-head, None without them; one of the two alone is refused."""
    if args.aesthetic_clip is None and args.aesthetic_head is None:
        return None
    if args.aesthetic_clip is None or args.aesthetic_head is None:
        raise BindWeaveInputError("The aesthetic score needs both --aesthetic-clip DIR and --aesthetic-head FILE.")
    import torch

    from bindweave.quality.aesthetic import AestheticScorer  # transformers loads only when asked for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return AestheticScorer.from_files(args.aesthetic_clip, args.aesthetic_head, device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = args.out or args.candidate_dir / "compare"
    try:
        comparison = compare_runs(args.reference_dir, args.candidate_dir, args.frame_stride, args.tile_width,
                                  aesthetic_scorer(args))
        written = write_comparison(comparison, out_dir)
    except BindWeaveInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(comparison.markdown)
    for path in written:
        print(f"wrote {path}")
    summary = comparison.report["summary"]
    if summary["failed"]:
        print(f"{summary['failed']} of {summary['failed'] + summary['compared']} samples could not be compared: "
              f"see the notes in {out_dir / MARKDOWN_NAME}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
