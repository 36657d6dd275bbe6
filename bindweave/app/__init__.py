"""The composition layer: config -> settings -> runtime -> engine -> exit code, the Hydra glue and the commands. The only part of bindweave/ that imports parallel/."""
