"""The DiT's shared host buffer (bindweave/model/host_buffer.py): one set of pages that another
process of the machine maps by its handle, filled once; the offload loader's weights are views of it.
The two-process case through the app is in tests/test_parallel_generate.py; pinning needs a GPU
(tests/test_memory_gpu.py)."""

import gc
import multiprocessing
import os

import pytest
import torch

from bindweave.errors import BindWeaveInputError
from bindweave.model.host_buffer import HostBuffer, HostBufferHandle
from bindweave.model.loading import load_bindweave_to_host_buffer, load_bindweave_transformer


def test_a_mapped_buffer_shares_the_creators_pages_and_outlives_it():
    filled = HostBuffer.filled(4096, lambda tensor: tensor.fill_(7))
    mapped = HostBuffer.attach(filled.handle)
    assert mapped.tensor.data_ptr() != filled.tensor.data_ptr()  # two mappings ...
    mapped.tensor[5] = 9
    assert filled.tensor[4:7].tolist() == [7, 9, 7]  # ... of the same pages
    fd = filled.handle.fd
    del filled
    gc.collect()
    assert not os.path.exists(f"/proc/self/fd/{fd}")  # the creator's memfd is closed with it
    assert mapped.tensor[4:7].tolist() == [7, 9, 7] and not mapped.pinned


def _write_through_a_child(handle: HostBufferHandle) -> None:
    HostBuffer.attach(handle).tensor[:3] = torch.tensor([1, 2, 3], dtype=torch.uint8)


def test_another_process_maps_the_same_pages_by_the_handle():
    filled = HostBuffer.filled(1 << 20, lambda tensor: tensor.zero_())
    child = multiprocessing.get_context("spawn").Process(target=_write_through_a_child, args=(filled.handle,))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0
    assert filled.tensor[:4].tolist() == [1, 2, 3, 0]


def test_a_handle_that_cannot_be_mapped_is_a_named_error():
    with pytest.raises(BindWeaveInputError, match=r"cannot map the DiT's shared host buffer of process 1 "
                                                  r"\(/proc/1/fd/999.*one PID namespace"):
        HostBuffer.attach(HostBufferHandle(pid=1, fd=999, nbytes=4096))


def test_the_offload_loader_fills_the_buffer_once_and_its_weights_are_views_of_it(tiny_models):
    calls = []

    def share(nbytes, fill):
        calls.append(nbytes)
        return HostBuffer.filled(nbytes, fill)

    streamed = load_bindweave_to_host_buffer(tiny_models.bindweave, torch.float32, share=share)
    peer = load_bindweave_to_host_buffer(tiny_models.bindweave, torch.float32,
                                         share=lambda nbytes, fill: HostBuffer.attach(streamed.host_buffer.handle))
    reference = load_bindweave_transformer(tiny_models.bindweave, torch.float32)
    assert len(calls) == 1 and calls[0] == streamed.host_buffer.handle.nbytes
    start, end = streamed.host_buffer.tensor.data_ptr(), streamed.host_buffer.tensor.data_ptr() + calls[0]
    expected = reference.state_dict()
    for model in (streamed, peer):  # the peer never read a file: its weights are the creator's pages
        assert model.state_dict().keys() == expected.keys()
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected[name]), name
    assert all(start <= parameter.data_ptr() < end for parameter in streamed.parameters())
