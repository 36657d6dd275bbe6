"""A Hugging Face hub cache whose repo ids resolve to local folders (the tiny models), offline.

``populate_hf_cache(cache_dir, {"ByteDance/BindWeave": folder, ...})`` lays each folder out as
one downloaded snapshot of that repo, exactly where and how huggingface_hub's own download writes
it, using huggingface_hub's own functions for every path and write:

    <cache_dir>/models--ByteDance--BindWeave/          file_download.repo_folder_name
        blobs/<etag>                                   (LFS files: sha256; others: git blob sha1,
                                                        utils.sha.git_hash) -- what the hub's
                                                        ETag header is, so what hf_hub_download names them
        snapshots/<commit>/<path> -> ../../blobs/<etag> file_download._get_pointer_path + _create_symlink
        refs/main                                      file_download._cache_commit_hash_for_specific_revision
        trees/<commit>.json                            _tree_cache.write_tree_cache (the listing that
                                                        snapshot_download checks a snapshot against)
    <cache_dir>/CACHEDIR.TAG                           file_download._create_cachedir_tag

``cache_dir`` is the hub cache: ``HF_HUB_CACHE``, i.e. ``$HF_HOME/hub`` (see :func:`hf_env`).
With ``HF_HUB_OFFLINE=1`` (or ``local_files_only=True``) ``snapshot_download(repo_id)`` returns
the snapshot folder, and ``scan_cache_dir()`` lists the repos without warnings (tests check both).
Written for huggingface_hub 2.4.0 (the pinned version); the private helpers it uses are named
in one place below, so a renamed one is an ImportError here rather than a wrong layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache
from huggingface_hub.file_download import (
    _cache_commit_hash_for_specific_revision,
    _create_cachedir_tag,
    _create_symlink,
    _get_pointer_path,
    repo_folder_name,
)
from huggingface_hub.utils.sha import git_hash, sha_fileobj

# Files the hub stores through Git LFS (HF's default .gitattributes patterns, and anything large).
LFS_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".model",
                ".gguf", ".pkl", ".npy", ".npz", ".tar", ".gz", ".zip"}
LFS_MIN_SIZE = 10 * 1024 * 1024


def hf_env(hf_home: str | os.PathLike) -> dict[str, str]:
    """Environment for a process that must find this cache: HF_HOME, and HF_HUB_CACHE under it
    (set too, so an inherited HF_HUB_CACHE cannot point elsewhere)."""
    return {"HF_HOME": str(hf_home), "HF_HUB_CACHE": str(Path(hf_home) / "hub")}


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _tree_entry(path: Path) -> tuple[str, TreeCacheEntry]:
    """(etag = blob file name in the cache, tree-listing entry) as the hub reports them."""
    size = path.stat().st_size
    if path.suffix in LFS_SUFFIXES or size >= LFS_MIN_SIZE:
        with open(path, "rb") as handle:
            sha256 = sha_fileobj(handle).hex()
        return sha256, TreeCacheEntry(size=size, blob_id=git_hash(_lfs_pointer(sha256, size)),
                                      lfs_sha256=sha256, lfs_size=size)
    blob_id = git_hash(path.read_bytes())
    return blob_id, TreeCacheEntry(size=size, blob_id=blob_id)


def populate_hf_cache(cache_dir: str | os.PathLike, repos: dict[str, str | os.PathLike],
                      revision: str = constants.DEFAULT_REVISION) -> dict[str, Path]:
    """Cache each ``{repo_id: folder}`` as one snapshot of model repo ``repo_id`` at ``revision``
    ("main"). Returns ``{repo_id: snapshot folder}``. The commit hash is derived from the files, so
    the same folder gives the same snapshot; re-populating is harmless."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _create_cachedir_tag(cache_dir)
    snapshots = {}
    for repo_id, folder in repos.items():
        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"{folder} holds no files to cache as {repo_id}")
        storage = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
        entries = {}
        etags = {}
        for path in files:
            relative = path.relative_to(folder).as_posix()
            etags[relative], entries[relative] = _tree_entry(path)
        # A 40-hex commit id that changes with the content (the hub's is a git commit sha1).
        commit = git_hash("".join(f"{name} {entries[name].blob_id}\n" for name in sorted(entries)).encode())
        for relative, etag in etags.items():
            blob = storage / "blobs" / etag
            if not blob.is_file():
                blob.parent.mkdir(parents=True, exist_ok=True)
                tmp = blob.with_name(f"{etag}.incomplete")
                shutil.copyfile(folder / relative, tmp)
                os.replace(tmp, blob)
            pointer = _get_pointer_path(str(storage), commit, os.path.join(*relative.split("/")))
            os.makedirs(os.path.dirname(pointer), exist_ok=True)
            _create_symlink(str(blob), pointer, new_blob=False)
        _cache_commit_hash_for_specific_revision(str(storage), revision, commit)
        write_tree_cache(str(storage), commit, entries)
        snapshots[repo_id] = storage / "snapshots" / commit
    return snapshots
