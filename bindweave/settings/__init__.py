"""The settings schemas: one frozen dataclass per group of settings, each the Hydra schema of its
config group (bindweave/app/config.py registers them; conf/ presets only override them), with its
own value checks.

These modules import neither the model libraries (diffusers, transformers) nor torch at import
time, so a wrong command line, ``--help`` or a job refused before loading answers in about a
second instead of after importing the whole model stack.
"""
