"""The shared host buffer an offloaded DiT's weights are views of when several processes of a
launch run on one machine (bindweave.model.loading; one process alone uses PyTorch's own
page-locked allocator).

It is anonymous shared memory (a Linux memfd), so that those processes map the same pages: local
rank 0 fills it from the files, the others map it (parallel.runtime hands them its handle), and
the 14B DiT is held once per machine instead of once per process (2 x 24 GB GPUs with ulysses2:
~32 GiB of host memory for the DiT, not ~64). A memfd is not bound by the size of /dev/shm (64 MiB
in a default container). On CUDA each process page-locks its mapping with ``cudaHostRegister``
(what the side stream copies from); PyTorch then sees the weights as pinned, and diffusers' group
offloading streams from them without another copy.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bindweave.errors import BindWeaveInputError


CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


@dataclass(frozen=True)
class HostBufferHandle:
    """What another process on the same machine needs to map the buffer: the creator's open memfd."""

    pid: int
    fd: int
    nbytes: int

    @property
    def path(self) -> str:
        return f"/proc/{self.pid}/fd/{self.fd}"


class HostBuffer:
    """``nbytes`` of shared host memory as a flat uint8 tensor (``.tensor``), kept mapped while this
    object lives; ``pin()`` page-locks it for CUDA copies until then."""

    def __init__(self, tensor: torch.Tensor, handle: HostBufferHandle, own_fd: int | None):
        self.tensor = tensor
        self.handle = handle
        # The creator keeps the memfd open, so that its peers can still open it by its /proc path.
        self._release = Release(own_fd)
        weakref.finalize(self, self._release).atexit = False  # at exit, the kernel and the driver release both

    @property
    def pinned(self) -> bool:
        return self._release.registered_address is not None

    @classmethod
    def create(cls, nbytes: int, name: str = "bindweave-dit") -> HostBuffer:
        if not hasattr(os, "memfd_create"):
            raise BindWeaveInputError("offloading with several processes per machine needs Linux (their shared host "
                                      "buffer is a memfd): start one process per machine, or use model.memory=resident")
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            handle = HostBufferHandle(os.getpid(), fd, nbytes)
            return cls(_map(f"/proc/self/fd/{fd}", nbytes), handle, fd)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def filled(cls, nbytes: int, fill: Callable[[torch.Tensor], None]) -> HostBuffer:
        """A new buffer, filled here by ``fill(tensor)``: the creator's side."""
        buffer = cls.create(nbytes)
        fill(buffer.tensor)
        return buffer

    @classmethod
    def attach(cls, handle: HostBufferHandle) -> HostBuffer:
        """Map the buffer another process of this machine created (and still holds open)."""
        try:
            tensor = _map(handle.path, handle.nbytes)
        except (OSError, RuntimeError) as error:
            raise BindWeaveInputError(
                f"cannot map the DiT's shared host buffer of process {handle.pid} ({handle.path}: {error}): the "
                f"processes of a launch on one machine share it, so they must run as one user in one PID "
                f"namespace (one container)") from None
        return cls(tensor, handle, None)

    def pin(self) -> None:
        """Page-lock the mapping for CUDA copies (unlocked when this object goes)."""
        address = self.tensor.data_ptr()
        error = torch.cuda.cudart().cudaHostRegister(address, self.handle.nbytes, CUDA_HOST_REGISTER_PORTABLE)
        if int(error) != 0:
            raise RuntimeError(f"cudaHostRegister of the DiT's {self.handle.nbytes / 2**30:.1f} GiB shared host "
                               f"buffer failed: CUDA error {int(error)}")
        self._release.registered_address = address
        # Group offloading would copy weights it does not see as pinned, once per process: fail instead.
        if not self.tensor.is_pinned():
            raise RuntimeError("the DiT's shared host buffer is registered with CUDA but PyTorch does not see it "
                               "as page-locked; start one process per machine (or keep the DiT resident)")


def _map(path: str, nbytes: int) -> torch.Tensor:
    """``path``'s first ``nbytes`` mapped shared (writes land in the file, every mapping sees them)."""
    storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


@dataclass
class Release:
    """What a HostBuffer gives back when it goes: its page lock first, then its memfd."""

    fd: int | None
    registered_address: int | None = None

    def __call__(self) -> None:
        if self.registered_address is not None:
            torch.cuda.cudart().cudaHostUnregister(self.registered_address)
        if self.fd is not None:
            os.close(self.fd)
