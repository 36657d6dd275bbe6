"""LoRA adapters merged into the BindWeave DiT as its tensors are read (``model.loras``).

Each file's keys name a parameter of Wan2.1-I2V-14B in one of the layouts people have:

- original Wan names, ``diffusion_model.blocks.3.self_attn.q.lora_down.weight`` (LightX2V, kijai;
  also without the prefix),
- diffusers/PEFT names, ``transformer.blocks.3.attn1.to_q.lora_A.weight`` (also ``base_model.model.``
  or no prefix),
- musubi-tuner names, ``lora_unet_blocks_3_self_attn_q.lora_down.weight``,

with the endings ``lora_A/lora_down.weight`` + ``lora_B/lora_up.weight`` (a low-rank pair, scaled
by ``.alpha`` / rank when the file has an alpha; else by the ``lora_alpha`` / ``alpha_pattern`` of
the PEFT config diffusers saves in the file's metadata; else 1), ``lora_B.bias`` (PEFT's bias of the
pair, scaled the same), ``.diff`` (a full weight delta), ``.diff_b`` (a bias delta) and ``.diff_m``
(LightX2V's modulation delta). What each file adds to a parameter ``W``, files in order, in float32
(the product added into W's rows by one GEMM) and cast once to W's dtype:

    W' = W + strength * (alpha / rank) * (B @ A)  +  strength * diff

Original Wan names are renamed with diffusers' own table (``convert_wan_transformer_to_diffusers``,
what its single-file loader uses for Wan checkpoints), which covers every module. diffusers' LoRA
converters are not used: ``_convert_non_diffusers_wan_lora_to_diffusers`` drops (logging at debug
or info level) the norms' ``.diff`` and ``.diff_b``, every weight ``.diff`` and the ``.diff_m``
modulation deltas (LightX2V's I2V distill LoRA has all three on every block), drops the
``time_projection`` keys of a LoRA without a pair there, and folds alpha into A and B in the file's
dtype (bf16 rounding); its musubi converter needs all 14 modules of every block with an alpha.

Everything is checked from the files' headers against the DiT's parameter shapes before any weight
of the DiT is read: a key that names no parameter, a shape that is not the parameter's (a LoRA for
Wan 1.3B or 5B), an unknown ending or a pair without its other half is one error naming the file and
the keys. The loaders (bindweave.model.loading, parallel/fsdp.py) call :meth:`LoraMerge.apply` on
every tensor they read, on the rows they read, so the merge is the same resident, offloaded
(merged once, into the host buffer) and FSDP-sharded (each rank its own rows), and it happens
before projections are fused, linears go FP8 or blocks are compiled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from bindweave.errors import BindWeaveInputError
from bindweave.io.checkpoint import FLOAT_DTYPES, SHOWN_KEYS
from bindweave.settings.lora import LoraSettings

log = logging.getLogger("bindweave")

# Key ending -> (its role, the leaf of the parameter it changes under the key's module).
ENDINGS = {
    ".lora_A.weight": ("down", "weight"), ".lora_down.weight": ("down", "weight"),
    ".lora_B.weight": ("up", "weight"), ".lora_up.weight": ("up", "weight"),
    ".alpha": ("alpha", "weight"),
    ".lora_B.bias": ("up_bias", "bias"),
    ".diff": ("diff", "weight"), ".diff_b": ("diff_b", "bias"), ".diff_m": ("diff_m", "modulation"),
}
FULL_DELTAS = ("diff", "diff_b", "diff_m")
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
DIFFUSERS_PREFIXES = ("transformer.", "base_model.model.")
MUSUBI_PREFIX = "lora_unet_"
PEFT_METADATA_KEY = "lora_adapter_metadata"  # the LoraConfig diffusers' save_lora_adapter writes (alpha, patterns)
# Original Wan module names with an underscore, which musubi's names cannot tell from its separators
# (longest first: norm_k_img before k_img and norm_k).
MUSUBI_COMPOUNDS = ("norm_k_img", "self_attn", "cross_attn", "k_img", "v_img", "norm_q", "norm_k",
                    "text_embedding", "time_embedding", "time_projection", "img_emb", "patch_embedding")
FORMATS = ("original Wan names (diffusion_model.blocks.N.self_attn.q.lora_down.weight), diffusers/PEFT names "
           "(transformer.blocks.N.attn1.to_q.lora_A.weight) or musubi names (lora_unet_blocks_N_self_attn_q."
           "lora_down.weight)")


@dataclass(frozen=True)
class LowRankTerm:
    """``factor * B @ A`` (``factor``: strength * alpha / rank) from two tensors of one file."""

    file: Path
    down: str
    up: str
    factor: float

    def add_to(self, merged: torch.Tensor, row_start: int) -> None:
        """Add this term's rows ``[row_start, row_start + len(merged))`` to ``merged`` (float32)."""
        with safe_open(self.file, framework="pt") as handle:
            down = handle.get_tensor(self.down).float().flatten(1)
            up = handle.get_slice(self.up)[row_start:row_start + merged.shape[0]].float().flatten(1)
        # One GEMM that adds into the rows (3x faster on the CPU than a product, a scale and an add).
        merged.view(merged.shape[0], -1).addmm_(up, down, alpha=self.factor)


@dataclass(frozen=True)
class FullTerm:
    """``factor * delta`` (``factor``: the strength, or strength * alpha / rank for a pair's bias)."""

    file: Path
    key: str
    factor: float

    def add_to(self, merged: torch.Tensor, row_start: int) -> None:
        with safe_open(self.file, framework="pt") as handle:
            merged.add_(handle.get_slice(self.key)[row_start:row_start + merged.shape[0]].float(), alpha=self.factor)


@dataclass(frozen=True)
class LoraFile:
    """One file of ``model.loras``, checked: its fingerprint and the parameters it changes."""

    path: Path
    strength: float
    sha256: str
    parameters: tuple[str, ...]


class LoraMerge:
    """What the LoRA files add to each parameter of the DiT (checkpoint names, diffusers' Wan keys)."""

    def __init__(self, files: Sequence[LoraFile], terms: Mapping[str, list[LowRankTerm | FullTerm]], blocks: int):
        self.files = list(files)
        self._terms = dict(terms)
        self._blocks = blocks  # how many the DiT has (the summary says how many each file changes)
        self.merge_s = 0.0  # seconds spent in apply, summed: what the LoRAs add to loading (sidecar timings)

    @classmethod
    def from_settings(cls, loras: Sequence[LoraSettings], parameter_shapes: Mapping[str, torch.Size]) -> LoraMerge:
        """Read the headers of ``loras``' files, map their keys onto ``parameter_shapes`` (the meta
        DiT's, unfused) and check them; raise one BindWeaveInputError for every file that does not fit."""
        files, terms, problems = [], {}, []
        for lora in loras:
            path = Path(lora.path).expanduser()
            file_terms, file_problems = _read_terms(path, lora.strength, parameter_shapes)
            if file_problems:
                problems.append(f"{path}: " + "; ".join(file_problems))
                continue
            for name, term in file_terms:
                terms.setdefault(name, []).append(term)
            with open(path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            files.append(LoraFile(path, lora.strength, digest, tuple(sorted({name for name, _ in file_terms}))))
        if problems:
            raise BindWeaveInputError(
                f"{len(problems)} LoRA file(s) in model.loras do not fit the BindWeave DiT (Wan2.1-I2V-14B "
                "with a text projector; nothing was loaded):\n  - " + "\n  - ".join(problems)
                + f"\nUse LoRAs made for Wan2.1-14B in {FORMATS}, or remove them from model.loras")
        merge = cls(files, terms, len({name.split(".")[1] for name in parameter_shapes if name.startswith("blocks.")}))
        if files:
            log.info("%s", merge.summary())
        return merge

    def changes(self, name: str) -> bool:
        return name in self._terms

    def apply(self, name: str, rows: torch.Tensor, row_start: int = 0) -> torch.Tensor:
        """Rows ``[row_start, row_start + len(rows))`` of parameter ``name`` with every file's delta
        added, in float32 (the caller casts once to the model's dtype); ``rows`` as they are when no
        file changes ``name``."""
        if name not in self._terms:
            return rows
        mark = time.perf_counter()
        merged = rows.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        for term in self._terms[name]:
            term.add_to(merged, row_start)
        self.merge_s += time.perf_counter() - mark
        return merged

    def record(self) -> list[dict]:
        """Per file, for sidecars and resume recipes: path, sha256, strength, parameters changed."""
        return [{"path": str(file.path), "sha256": file.sha256, "strength": file.strength,
                 "parameters": len(file.parameters)} for file in self.files]

    def summary(self) -> str:
        lines = []
        for file in self.files:
            touched = {name.split(".")[1] for name in file.parameters if name.startswith("blocks.")}
            outside = sum(not name.startswith("blocks.") for name in file.parameters)
            lines.append(f"LoRA {file.path.name} (strength {file.strength:g}, sha256 {file.sha256[:12]}): "
                         f"{len(file.parameters)} parameters in {len(touched)} of {self._blocks} blocks"
                         + (f" and {outside} outside them" if outside else ""))
        return "\n".join(lines)


def _read_terms(path: Path, strength: float, shapes: Mapping[str, torch.Size]):
    """One file's terms as (parameter, term) pairs, and what is wrong with it (from its header)."""
    header = _read_header(path)
    if isinstance(header, str):
        return [], [header]
    tensors, peft_config = header
    unknown, unmatched, wrong, incomplete, groups = [], [], [], [], {}
    for key, (shape, dtype) in tensors.items():
        ending = next((ending for ending in ENDINGS if key.endswith(ending)), None)
        if ending is None:
            unknown.append(key)
            continue
        role, leaf = ENDINGS[ending]
        if dtype not in FLOAT_DTYPES and role != "alpha":  # an alpha may be stored as an integer
            wrong.append(f"{key} is {dtype}, not a float")
        module = key[:-len(ending)]
        target = _parameter_name(module, leaf, shapes)
        if target is None:
            unmatched.append(key)
            continue
        roles = groups.setdefault(module, {})
        if role in roles:
            wrong.append(f"{roles[role][0]} and {key} both give the {role} of {module}")
        roles[role] = (key, shape, target)
    terms = [term for roles in groups.values()
             for term in _module_terms(path, strength, roles, peft_config, shapes, wrong, incomplete)]

    problems = []
    for label, keys in ((f"keys with an unknown ending (known: {', '.join(ENDINGS)})", unknown),
                        ("keys that name no parameter of the DiT", unmatched),
                        ("wrong shapes or dtypes", wrong), ("incomplete pairs", incomplete)):
        if keys:
            more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
            problems.append(f"{len(keys)} {label}: {', '.join(sorted(keys)[:SHOWN_KEYS])}{more}")
    return terms, problems


def _read_header(path: Path) -> tuple[dict, dict] | str:
    """The file's tensors (key -> shape, dtype) and the PEFT config in its metadata, or what is wrong."""
    if not path.is_file():
        return "no such file (fix model.loras' path)"
    try:
        with safe_open(path, framework="pt") as handle:
            tensors = {key: (tuple(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                       for key in handle.keys()}
            metadata = handle.metadata() or {}
    except Exception as error:  # truncated, or not a safetensors file
        return f"not a readable safetensors file ({error})"
    if not tensors:
        return "it holds no tensors"
    try:
        peft_config = json.loads(metadata.get(PEFT_METADATA_KEY) or "{}")
    except json.JSONDecodeError as error:
        return f"its {PEFT_METADATA_KEY} metadata is not JSON ({error})"
    if peft_config.get("use_dora"):
        return "it is a DoRA (use_dora in its metadata), which is not merged here: use a plain LoRA"
    return tensors, peft_config


def _module_terms(path: Path, strength: float, roles: dict, peft_config: dict, shapes: Mapping[str, torch.Size],
                  wrong: list[str], incomplete: list[str]) -> list:
    """The terms of one module's keys (``roles``: role -> key, shape, parameter); problems go to
    ``wrong`` and ``incomplete``."""
    terms = []
    for key, shape, target in (roles[role] for role in FULL_DELTAS if role in roles):
        if shape != tuple(shapes[target]):
            wrong.append(f"{key} {list(shape)} (the DiT's {target} is {list(shapes[target])})")
        terms.append((target, FullTerm(path, key, strength)))
    down, up = roles.get("down"), roles.get("up")
    if down is None or up is None:
        if down or up:
            incomplete.append(f"{(down or up)[0]} without its "
                              + ("lora_B (lora_up)" if up is None else "lora_A (lora_down)"))
        else:
            incomplete += [f"{roles[role][0]} without its lora_A/lora_B pair" for role in ("alpha", "up_bias")
                           if role in roles]
        return terms
    (down_key, down_shape, target), (up_key, up_shape, _) = down, up
    if not _pair_fits(down_shape, up_shape, tuple(shapes[target])):
        wrong.append(f"{down_key} {list(down_shape)} / {up_key} {list(up_shape)} "
                     f"(the DiT's {target} is {list(shapes[target])})")
        return terms
    rank = down_shape[0]
    scale = _peft_scale(peft_config, target.removesuffix(".weight"), rank) if peft_config else 1.0
    if "alpha" in roles:
        alpha_key, alpha_shape, _ = roles["alpha"]
        if torch.Size(alpha_shape).numel() != 1:
            wrong.append(f"{alpha_key} {list(alpha_shape)} (an alpha is one number)")
            return terms
        with safe_open(path, framework="pt") as handle:
            scale = handle.get_tensor(alpha_key).item() / rank
    terms.append((target, LowRankTerm(path, down_key, up_key, strength * scale)))
    if "up_bias" in roles:
        key, shape, bias = roles["up_bias"]
        if shape != tuple(shapes[bias]):
            wrong.append(f"{key} {list(shape)} (the DiT's {bias} is {list(shapes[bias])})")
        terms.append((bias, FullTerm(path, key, strength * scale)))
    return terms


def _peft_scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of ``module`` from the LoraConfig diffusers saves in the file's metadata:
    lora_alpha (or the first alpha_pattern that names the module, PEFT's match) / rank (sqrt with rsLoRA)."""
    alpha = config.get("lora_alpha", rank)
    for pattern, pattern_alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = pattern_alpha
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _pair_fits(down_shape, up_shape, shape) -> bool:
    """A pair fits ``shape`` (out, in, *kernel) when A is (rank, in, *kernel) and B (out, rank, 1...)."""
    return (len(shape) >= 2 and len(down_shape) >= 2 and len(up_shape) >= 2
            and up_shape[0] == shape[0] and up_shape[1] == down_shape[0]
            and torch.Size(up_shape[2:]).numel() == 1
            and torch.Size(down_shape[1:]).numel() == torch.Size(shape[1:]).numel())


def _parameter_name(module: str, leaf: str, shapes: Mapping[str, torch.Size]) -> str | None:
    """The DiT parameter (diffusers' Wan key) that ``module.leaf`` names in the key's layout, if any."""
    for prefix in DIFFUSERS_PREFIXES:
        if module.startswith(prefix):
            return _existing(f"{module[len(prefix):]}.{leaf}", shapes)
    for prefix in ORIGINAL_PREFIXES:
        if module.startswith(prefix):
            return _existing(diffusers_name(f"{module[len(prefix):]}.{leaf}"), shapes)
    if module.startswith(MUSUBI_PREFIX):
        return _existing(diffusers_name(f"{_from_musubi(module[len(MUSUBI_PREFIX):])}.{leaf}"), shapes)
    # No prefix: diffusers' name if the DiT has it, else an original Wan name (the two never collide:
    # the original blocks' affine norm is norm3, diffusers' norm2).
    return _existing(f"{module}.{leaf}", shapes) or _existing(diffusers_name(f"{module}.{leaf}"), shapes)


def _existing(name: str, shapes: Mapping[str, torch.Size]) -> str | None:
    return name if name in shapes else None


def diffusers_name(original_name: str) -> str:
    """An original Wan parameter name (``blocks.3.self_attn.q.weight``) in diffusers' naming, by diffusers' own table."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    (converted,) = convert_wan_transformer_to_diffusers({original_name: None})
    return converted


def _from_musubi(module: str) -> str:
    """``blocks_3_self_attn_q`` -> ``blocks.3.self_attn.q`` (musubi writes the original name's dots as _)."""
    name = module.replace("_", ".")
    for compound in MUSUBI_COMPOUNDS:
        name = re.sub(rf"(?<![^.]){re.escape(compound.replace('_', '.'))}(?![^.])", compound, name)
    return name
