"""Quality checks of finished outputs: comparing two runs of the same stage-3 jobs (PSNR, SSIM, latents, speed-up)."""
