"""The conditioning models: UMT5, CLIP + reference canvases, the Wan VAE and the video condition (SPEC §5), Qwen2.5-VL (stages 1 and 2)."""
