"""UniPC with the reference's sigma grid, the noise, the step context and the one CFG formula (SPEC §6)."""
