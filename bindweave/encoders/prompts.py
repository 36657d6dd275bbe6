"""Negative prompts, verbatim from the reference (SPEC §7): model inputs, not style choices."""

T5_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards, split screen, divided frame, "
    "frame split, multiple parts, separated"
)

# Stage 2's negative pass: the T5 text followed directly (no space) by the motion terms.
QWEN_NEGATIVE_PROMPT = T5_NEGATIVE_PROMPT + ",motionless, frozen, still image, no movement, stationary, unmoving"
