"""Everything distributed for stage 3, applied from outside the model (ARCHITECTURE §3).

``layout`` (the degrees, validated first) -> ``distributed`` (torchrun / srun / one process) ->
``runtime`` (one device mesh, every process group) -> ``parallelize`` (the DiT's attention hook,
the samples of each data group), with ``sequence`` (split / attend / gather), its two backends
``deepspeed_backend`` and ``xfuser_backend``, and ``cfg`` (the two CFG passes at once).
"""
