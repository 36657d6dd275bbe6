"""Strict loading of checkpoint folders (local, or a Hugging Face repo id resolved offline-first).

diffusers' ``from_pretrained`` only WARNS on missing or unexpected keys and leaves random
weights behind; a video from such a model is noise that looks like a bug elsewhere. Here every
missing/unexpected key, wrong shape or non-float dtype is an error naming the folder and the
first offending keys, and it is found from the safetensors headers before any weight is read.

Tensors are read one at a time (mmap) and cast straight to the target dtype and device, so a
14B model never exists as an fp32 copy (the diffusers repos store fp32).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from bindweave.errors import BindWeaveInputError

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SHOWN_KEYS = 8


class TensorDeltas(Protocol):
    """What a loader adds to the tensors it reads, row by row (bindweave.model.lora.LoraMerge)."""

    def changes(self, name: str) -> bool: ...

    def apply(self, name: str, rows: torch.Tensor, row_start: int = 0) -> torch.Tensor: ...


def resolve_folder(path_or_repo_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a HF repo id through huggingface_hub (cache first, offline-friendly)."""
    local = Path(path_or_repo_id).expanduser()
    if local.exists():
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise BindWeaveInputError(f"model folder {folder} does not exist (subfolder {subfolder!r} of {local})")
        return folder
    repo_id = str(path_or_repo_id)
    if local.parts and Path(local.parts[0]).is_dir() and not local.is_absolute():
        # weights/BindWeave: its first folder is here, so it is a local path that does not exist.
        raise BindWeaveInputError(
            f"model folder {local} does not exist (no {local.name!r} in {local.parent.resolve()}): download it "
            f"there (README \"Weights\": hf download ... --local-dir {local}) or fix the path")
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".", "~")):
        raise BindWeaveInputError(
            f"model path {repo_id} does not exist and is not a Hugging Face repo id (owner/name): "
            "fix the path in the model config"
        )
    from huggingface_hub import snapshot_download

    patterns = [f"{subfolder}/*" if subfolder else "*.json", f"{subfolder}/*" if subfolder else "*.safetensors*"]
    try:
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as error:  # network, auth, missing repo, offline cache miss
        raise BindWeaveInputError(
            f"{repo_id} is not a local folder, and the Hugging Face hub could not provide it "
            f"({type(error).__name__}: {error}). Download it first (README \"Weights\": hf download {repo_id} "
            f"--local-dir weights/{repo_id.split('/')[-1]}) and pass that folder"
        ) from error
    return Path(snapshot) / subfolder if subfolder else Path(snapshot)


def read_config(folder: Path, model_class, defaults: dict) -> dict:
    """``config.json`` arguments the class takes, over ``defaults`` (a bare safetensors folder uses them)."""
    config = dict(defaults)
    config_file = folder / "config.json"
    if config_file.exists():
        try:
            stored = json.loads(config_file.read_text())
        except json.JSONDecodeError as error:
            raise BindWeaveInputError(f"{config_file} is not valid JSON ({error}): re-download the model folder") from error
        accepted = inspect.signature(model_class.__init__).parameters
        config.update({key: value for key, value in stored.items() if key in accepted})
    return config


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def index_checkpoint(folder: Path) -> dict[str, TensorInfo]:
    """Key -> (file, shape, dtype) from the safetensors headers (sharded index json or all root files)."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise BindWeaveInputError(f"{indexes[0]} is not a valid sharded-checkpoint index ({error})") from error
        files = sorted({folder / name for name in weight_map.values()})
        missing_files = [str(file.name) for file in files if not file.exists()]
        if missing_files:
            raise BindWeaveInputError(
                f"{folder}: the index {indexes[0].name} names shard files that are missing: "
                f"{missing_files[:SHOWN_KEYS]}; finish the download of this folder"
            )
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BindWeaveInputError(f"{folder} holds no *.safetensors files: point the model config at the checkpoint folder")

    tensors: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    if key in tensors:
                        raise BindWeaveInputError(f"{folder}: key {key} is in both {tensors[key].file.name} and {file.name}")
                    view = handle.get_slice(key)
                    tensors[key] = TensorInfo(file, tuple(view.get_shape()), view.get_dtype())
        except BindWeaveInputError:
            raise
        except Exception as error:  # truncated or not a safetensors file
            raise BindWeaveInputError(f"{file} is not a readable safetensors file ({error}): re-download it") from error
    return tensors


def checked_index(model: torch.nn.Module, folder: Path) -> dict[str, TensorInfo]:
    """``folder``'s tensors, indexed from the headers and checked against ``model``'s state dict
    (shapes only: the model may still be on the meta device), before any weight is read."""
    tensors = index_checkpoint(folder)
    check_against_model(folder, tensors, {name: tensor.shape for name, tensor in model.state_dict().items()})
    return tensors


def check_against_model(folder: Path, tensors: dict[str, TensorInfo], expected: dict[str, torch.Size]) -> None:
    """Raise one error listing every kind of mismatch (missing, unexpected, shape, dtype)."""
    problems = []
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [
        f"{key} {list(tensors[key].shape)} (model expects {list(expected[key])})"
        for key in sorted(set(expected) & set(tensors))
        if tensors[key].shape != tuple(expected[key])
    ]
    wrong_dtype = [f"{key} {info.dtype}" for key, info in sorted(tensors.items()) if info.dtype not in FLOAT_DTYPES]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("wrong shapes", wrong_shape), ("non-float dtypes", wrong_dtype)):
        if keys:
            more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:SHOWN_KEYS])}{more}")
    if problems:
        raise BindWeaveInputError(
            f"checkpoint folder {folder} does not match the model config: " + "; ".join(problems)
            + ". Check that the folder (and its config.json) belong to this model and that the download is complete"
        )


def read_rows(file: Path, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of one tensor, read with exactly one ``preadv`` of their bytes.

    Sharded loading uses this instead of the mmap: a mapping faults in (and keeps resident)
    neighbouring pages of other ranks' rows, which would defeat "each rank reads only its share".
    ``out`` (same dtype, contiguous) is read into directly, with no copy between: the offload
    loader fills its one page-locked buffer this way (the 14B DiT: 68 s with an intermediate
    bytes object and a concatenation per tensor, NVIDIA H200 machine, 2026-12-02).
    """
    with open(file, "rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        entry = json.loads(handle.read(header_size))[key]
        shape, dtype = (stop - start, *entry["shape"][1:]), FLOAT_DTYPES[entry["dtype"]]
        if out is not None and tuple(out.shape) != shape:
            raise ValueError(f"{key}: rows {start}:{stop} have shape {list(shape)}, the destination {list(out.shape)}")
        direct = out is not None and out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"
        rows = out if direct else torch.empty(shape, dtype=dtype)
        row_bytes = dtype.itemsize * int(torch.Size(shape[1:]).numel())
        offset = 8 + header_size + entry["data_offsets"][0] + start * row_bytes
        read = os.preadv(handle.fileno(), [memoryview(rows.view(-1).view(torch.uint8).numpy())], offset)
    if read != rows.nbytes:
        raise BindWeaveInputError(f"{file} ends inside tensor {key} (read {read} of {rows.nbytes} bytes): re-download it")
    if out is not None and not direct:
        out.copy_(rows)
    return out if out is not None else rows


def read_stacked_rows(tensors: dict[str, TensorInfo], names: list[str], start: int, stop: int,
                      out: torch.Tensor | None = None, deltas: TensorDeltas | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of the checkpoint tensors ``names`` stacked by rows, reading only those
    rows (into ``out`` when given, each tensor's rows into their slice of it), with ``deltas`` added
    to the rows they change (in float32, cast once into ``out``)."""
    pieces, offset, filled = [], 0, 0
    for name in names:
        info = tensors[name]
        first, last = max(start, offset), min(stop, offset + info.shape[0])
        if last > first:
            part = None if out is None else out[filled:filled + last - first]
            if deltas is not None and deltas.changes(name):
                merged = deltas.apply(name, read_rows(info.file, name, first - offset, last - offset), first - offset)
                pieces.append(merged if part is None else part.copy_(merged))
            else:
                pieces.append(read_rows(info.file, name, first - offset, last - offset, part))
            filled += last - first
        offset += info.shape[0]
    return out if out is not None else torch.cat(pieces)


def set_load_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Each parameter of a meta-device model in the dtype it loads in: ``dtype``, or float32 where
    diffusers keeps it (:func:`keeps_fp32`)."""
    fp32_modules = getattr(model, "_keep_in_fp32_modules", None)
    for name, parameter in model.named_parameters():
        parameter.data = parameter.data.to(torch.float32 if keeps_fp32(name, fp32_modules) else dtype)


def keeps_fp32(name: str, fp32_modules: list[str] | None) -> bool:
    """diffusers' rule: parameters under these module names stay fp32 (time embedding, modulation, norms)."""
    return any(module in name.split(".") for module in fp32_modules or [])


def load_strict(model: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device | str,
                deltas: TensorDeltas | None = None) -> None:
    """Fill a meta-device ``model`` from ``folder``, one tensor at a time, checked first (with
    ``deltas`` added in float32 before each tensor is cast to its dtype)."""
    tensors = checked_index(model, folder)
    fp32_modules = getattr(model, "_keep_in_fp32_modules", None)
    state = {}
    by_file: dict[Path, list[str]] = {}
    for key, info in tensors.items():
        by_file.setdefault(info.file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as handle:
            for key in keys:
                target = torch.float32 if keeps_fp32(key, fp32_modules) else dtype
                tensor = handle.get_tensor(key)
                if deltas is not None:
                    tensor = deltas.apply(key, tensor)
                state[key] = tensor.to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)


def folder_fingerprint(folder: Path) -> dict:
    """Cheap identity of a model folder: HF snapshot revision when cached, else a hash of its
    configs and weight-file names/sizes (hashing 33 GB of weights per run is not cheap)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".txt", ".model"):
            relative = str(path.relative_to(folder))
            digest.update(relative.encode())
            digest.update(path.read_bytes() if path.suffix == ".json" else str(path.stat().st_size).encode())
    parts = folder.resolve().parts
    revision = parts[parts.index("snapshots") + 1] if "snapshots" in parts else None
    return {"folder": str(folder), "revision": revision, "fingerprint": digest.hexdigest()[:16]}
