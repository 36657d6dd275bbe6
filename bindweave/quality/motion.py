"""Motion amplitude of a video, from optical flow and no learned weights: how much moves, in pixels
per frame at the video's own size. Two runs of one job compared side by side show whether a fast
mode (a 4-step draft) froze the motion.

    amplitude = motion_amplitude(frames)  # uint8 RGB [F, H, W, 3] -> float (None below 2 frames)

Per pair of consecutive frames: both in grey (ITU-R BT.709 luma, scikit-image's ``rgb2gray``),
scaled to at most FLOW_SIDE pixels on the long side (anti-aliased), the dense flow by iterative
Lucas-Kanade (``skimage.registration.optical_flow_ilk``), each pixel's displacement length scaled
back to the video's pixels, averaged over the frame; the amplitude is the mean over all pairs.

What this matches of OpenS2V-Eval's MotionAmplitude (``eval/get_motionscore.py`` of
PKU-YuanGroup/OpenS2V-Nexus, ``motion_fb``): dense optical flow between every pair of consecutive
frames of the whole video, in grey, averaged over the frame and over the pairs, in pixels per
frame. What it does differently, on purpose:

- the flow is scikit-image's ILK, not OpenCV's Farneback (no OpenCV dependency), so the numbers
  are not the leaderboard's; they compare two runs measured the same way;
- it averages each pixel's displacement *length*; OpenS2V averages the signed x and y components
  together (after shrinking the flow map to 16 pixels wide) and takes the absolute value, so
  motions in opposite directions (a wave, a turn, an orbiting camera) cancel there and add here;
- grey uses RGB weights (OpenS2V converts RGB frames with OpenCV's BGR weights);
- the flow runs on frames shrunk to FLOW_SIDE (cost: ~45 ms a pair, ~4 s for an 81-frame video on
  one CPU core), with the lengths scaled back, so 480P and 720P videos read in their own pixels.
"""

from __future__ import annotations

import numpy as np
from skimage.color import rgb2gray
from skimage.registration import optical_flow_ilk
from skimage.transform import resize

FLOW_SIDE = 256  # the long side the flow is computed at (OpenS2V's score keeps only a 16-pixel-wide map)
FLOW_WARPS = 3  # ILK's warps: on a moving textured square within 6% of the default 10, a fifth of the time


def motion_amplitude(frames: np.ndarray) -> float | None:
    """Mean optical-flow displacement of uint8 RGB frames ``[F, H, W, 3]`` in pixels per frame
    (module docstring); None for a video of fewer than two frames."""
    if len(frames) < 2:
        return None
    height, width = frames.shape[1:3]
    scale = min(1.0, FLOW_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    grey = [resize(rgb2gray(frame), size, anti_aliasing=scale < 1).astype(np.float32) for frame in frames]
    per_pair = []
    for before, after in zip(grey, grey[1:]):
        rows, columns = optical_flow_ilk(before, after, num_warp=FLOW_WARPS)
        # Back to the video's pixels: a shift of one flow pixel is 1 / scale pixels there.
        per_pair.append(float(np.hypot(rows * height / size[0], columns * width / size[1]).mean()))
    return float(np.mean(per_pair))
