"""The running layout: this rank's coordinates and the process groups, all sliced from ONE device mesh.

Mesh dimensions, slowest first: ``data`` (different samples), ``cfg`` (positive / negative pass),
``sequence`` (ranks sharing one sample's tokens). Adjacent ranks share a sequence group, so
on one node its all-to-alls stay on NVLink. Nothing else in the project creates process groups
(xfuser makes its own, for the same ranks, inside :mod:`parallel.xfuser_backend`).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from bindweave.errors import BindWeaveInputError
from bindweave.model.host_buffer import HostBuffer
from parallel.cfg import parallel_guided_velocity
from parallel.distributed import Processes
from parallel.layout import ParallelLayout

MESH_DIMS = ("data", "cfg", "sequence")
T = TypeVar("T")
SampleT = TypeVar("SampleT")


class RaisedOnRank0(BindWeaveInputError):
    """Rank 0's input error, raised on the other ranks so that they stop too; rank 0 reports it."""


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in the layout. One process: no mesh, every coordinate 0."""

    layout: ParallelLayout
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes of the launch on this machine
    mesh: DeviceMesh | None = None
    fsdp_mesh: DeviceMesh | None = None
    sample_mesh: DeviceMesh | None = None  # 1-D: the cfg x sequence ranks of one sample (parallel decode)

    @classmethod
    def single_process(cls, device: torch.device) -> Runtime:
        return cls(layout=ParallelLayout(), device=torch.device(device))

    @classmethod
    def build(cls, layout: ParallelLayout, processes: Processes, device: torch.device) -> Runtime:
        """After ``start_process_group``: slice the groups (a collective: every rank calls it)."""
        if layout.sequence > 1:  # "auto" settles here, so the runtime (and each sidecar) names the backend used
            layout = replace(layout, backend=layout.attention_backend(device.type))
        mesh = fsdp_mesh = sample_mesh = None
        if processes.world_size > 1:
            mesh = init_device_mesh(device.type, (layout.data, layout.cfg, layout.sequence), mesh_dim_names=MESH_DIMS)
            fsdp_mesh = _fsdp_mesh(layout, mesh, device.type)
            if layout.decode == "split" and layout.cfg * layout.sequence > 1:
                sample_mesh = _group_mesh(layout, device.type)
        return cls(layout=layout, device=device, rank=processes.rank, world_size=processes.world_size,
                   local_rank=processes.local_rank, local_world_size=processes.local_world_size, mesh=mesh, fsdp_mesh=fsdp_mesh, sample_mesh=sample_mesh)

    def _coordinate(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank(dim)

    @property
    def data_rank(self) -> int:
        return self._coordinate("data")

    @property
    def cfg_rank(self) -> int:
        """0: the positive (conditional) pass, 1: the negative one (with cfg=2)."""
        return self._coordinate("cfg")

    @property
    def sequence_rank(self) -> int:
        return self._coordinate("sequence")

    @property
    def sequence_group(self) -> dist.ProcessGroup | None:
        return None if self.mesh is None else self.mesh.get_group("sequence")

    @property
    def cfg_group(self) -> dist.ProcessGroup | None:
        return None if self.mesh is None else self.mesh.get_group("cfg")

    @property
    def is_writer(self) -> bool:
        """One rank per data group writes each of its samples."""
        return self.sequence_rank == 0 and self.cfg_rank == 0

    def from_rank0(self, compute: Callable[[], T]) -> T:
        """Run ``compute`` on rank 0 only and hand its (picklable) result to every rank.

        One decision (which samples exist, which are done) is then followed everywhere. An input
        error in it is raised on rank 0 as it is, and on every other rank as
        :class:`RaisedOnRank0`, so that all of them stop and only rank 0 reports it.
        """
        if self.mesh is None:
            return compute()
        outcome = [None]
        if self.rank == 0:
            try:
                outcome = [(compute(), None)]
            except BindWeaveInputError as error:
                outcome = [(None, error)]
        dist.broadcast_object_list(outcome, src=0)
        value, error = outcome[0]
        if error is not None:
            raise error if self.rank == 0 else RaisedOnRank0(str(error))
        return value


    def share_host_buffer(self, nbytes: int, fill: Callable[[torch.Tensor], None]) -> HostBuffer:
        """One host buffer per machine (bindweave.model.host_buffer): local rank 0 creates it and
        ``fill``s it, then the launch's other processes on that machine map the same pages. A
        collective of the default group: every rank calls it. A fill that fails on local rank 0
        stops its peers too."""
        made = failure = None
        if self.local_rank == 0:
            try:
                made = HostBuffer.filled(nbytes, fill)
            except BindWeaveInputError as error:
                failure = error
        machine = socket.gethostname()
        shared = [None] * self.world_size
        dist.all_gather_object(shared, (machine, made.handle if made else None, str(failure) if failure else None))
        if failure is not None:
            raise failure
        if made is not None:
            return made
        leaders = [(handle, problem) for host, handle, problem in shared if host == machine and (handle or problem)]
        if len(leaders) != 1:
            raise BindWeaveInputError(f"{len(leaders)} processes of the launch on {machine} say they are its local "
                                      f"rank 0: the launcher's LOCAL_RANK / SLURM_LOCALID are inconsistent")
        handle, problem = leaders[0]
        if problem is not None:
            raise RaisedOnRank0(f"local rank 0 could not load the DiT: {problem}")
        return HostBuffer.attach(handle)

    def own_samples(self, samples: Sequence[SampleT]) -> list[SampleT]:
        """This data group's share: the samples sorted by id, strided over the data groups.

        Every rank of a data group gets the same list; no other rank opens these samples' files.
        """
        ordered = sorted(samples, key=lambda sample: sample.sample_id)
        return ordered[self.data_rank::self.layout.data]

    def guided_velocity(self, predict, guidance_scale: float):
        """CFG over the layout: both sides here (cfg=1) or this CFG group's side, exchanged (parallel/cfg.py)."""
        return parallel_guided_velocity(predict, guidance_scale, self.layout.cfg, self.cfg_rank, self.cfg_group)

    def layout_record(self) -> dict:
        return asdict(self.layout)

    def decode(self, vae, latents):
        """The video's frames on every rank of the sample's group: each decodes the whole video, or
        (``parallel.decode=split``) its band of rows, gathered (parallel/decode.py)."""
        if self.sample_mesh is None:
            return vae.decode_to_frames(latents)
        from parallel.decode import split_decode

        return split_decode(vae, latents, self.sample_mesh.get_group(), self.device)


def _fsdp_mesh(layout: ParallelLayout, mesh: DeviceMesh, device_type: str) -> DeviceMesh | None:
    """The 1-D mesh FSDP shards over; None when nothing is sharded or the scope is one rank."""
    if not layout.fsdp:
        return None
    if layout.fsdp_scope == "sequence":
        scope = mesh["sequence"]
    elif layout.fsdp_scope == "world":
        scope = init_device_mesh(device_type, (layout.world_size,), mesh_dim_names=("world",))
    else:
        scope = _group_mesh(layout, device_type)
    return scope if scope.size() > 1 else None


def _group_mesh(layout: ParallelLayout, device_type: str) -> DeviceMesh:
    """The cfg x sequence ranks of one data group (the ranks that share a sample), as one dimension."""
    return init_device_mesh(device_type, (layout.data, layout.cfg * layout.sequence),
                            mesh_dim_names=("data", "group"))["group"]
