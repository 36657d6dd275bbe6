"""Reading the inputs of a run: the meta JSON, reference images and Qwen2.5-VL hidden states.

The meta JSON is the official format (SPEC §2). Hidden states come either as the official
`.pt` files (one bare tensor per file, positive and negative apart) or as the project's own
safetensors file holding both. Nothing here opens a file before it is asked to, so each rank
reads only the inputs of its own samples.
"""

from __future__ import annotations

import json
import os
import pickle
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bindweave.errors import BindWeaveInputError
from bindweave.io.outputs import atomic_write

MAX_REFERENCES = 4
QWEN_HIDDEN_DIM = 3584
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
HIDDEN_STATES_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# A sample id is a file name stem (<id>.mp4, hidden_states/<id>_hidden_states_negative.pt, ...):
# names are limited to 255 bytes, so the id keeps room for the longest suffix and temp markers.
MAX_SAMPLE_ID_BYTES = 200
# Unicode categories refused in ids: control, format (zero-width, bidi), surrogate, line breaks.
_REFUSED_ID_CATEGORIES = {"Cc": "control", "Cf": "format", "Cs": "surrogate", "Zl": "line separator",
                          "Zp": "paragraph separator"}
_ID_NAMES_FILES = "<id>.mp4, <id>.json, hidden_states/<id>.safetensors"

# PIL opens 16-bit grayscale PNG/TIFF in these modes ("I" is its 32-bit container for them).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class Sample:
    """One entry of the meta JSON, with paths resolved.

    `fields` is the sample's original JSON dict, unknown keys (synthesis_flag, class_label, ...)
    included, so that outputs can carry them along untouched.
    """

    sample_id: str
    prompt: str
    image_paths: tuple[Path, ...]
    hidden_states_path: Path | None
    hidden_states_path_negative: Path | None
    seed: int | None
    fields: dict = field(hash=False, repr=False)


def sample_id_problem(sample_id: object) -> str | None:
    """Why `sample_id` cannot be used as a file name stem, or None when it can.

    Sample ids name output files in every stage, and a resident server takes them from requests, so
    an id must be one plain, visible, portable file name on its own: not empty, no path separator,
    not hidden (leading '.': the launcher's temp files are `.NAME.PID.tmp.EXT`; also '.' and '..'),
    no control or invisible characters, no leading or trailing whitespace, and at most
    MAX_SAMPLE_ID_BYTES bytes in UTF-8.
    """
    if not isinstance(sample_id, str):
        return f"is a {type(sample_id).__name__}, not a string"
    if not sample_id:
        return "is empty"
    for char in sample_id:
        category = unicodedata.category(char)
        if category in _REFUSED_ID_CATEGORIES:
            return (f"contains the {_REFUSED_ID_CATEGORIES[category]} character U+{ord(char):04X}"
                    f"{' (NUL)' if char == chr(0) else ''}")
    for separator in sorted({"/", "\\", os.sep, os.altsep} - {None}):
        if separator in sample_id:
            return f"contains the path separator {separator!r}"
    if sample_id in (".", ".."):
        return f"is {sample_id!r}, which names a folder"
    if sample_id.startswith("."):
        return "starts with '.' (hidden names are reserved for the launcher's temp files)"
    if sample_id != sample_id.strip():
        return "has leading or trailing whitespace"
    size = len(sample_id.encode("utf-8"))
    if size > MAX_SAMPLE_ID_BYTES:
        return (f"is {size} bytes long in UTF-8; the limit is {MAX_SAMPLE_ID_BYTES} (file names are limited to "
                f"255 bytes, and suffixes such as '_hidden_states_negative.pt' are added)")
    return None


def require_safe_sample_id(sample_id: object, where: str) -> None:
    """Raise BindWeaveInputError (prefixed with `where`) when `sample_id` is not a safe file name."""
    problem = sample_id_problem(sample_id)
    if problem is None:
        return
    suggestion = _suggested_sample_id(sample_id) if isinstance(sample_id, str) else None
    raise BindWeaveInputError(
        f"{where}: the sample id {sample_id!r} {problem}. The id names the sample's output files "
        f"({_ID_NAMES_FILES}), so it must be one plain file name: rename the key in the meta JSON"
        + (f", e.g. to {suggestion!r}." if suggestion else ".")
    )


def _suggested_sample_id(sample_id: str) -> str | None:
    """A safe id close to `sample_id` (path parts joined with '_'), or None if there is none."""
    visible = "".join(char for char in sample_id if unicodedata.category(char) not in _REFUSED_ID_CATEGORIES)
    for separator in {"/", "\\", os.sep, os.altsep} - {None}:
        visible = visible.replace(separator, "/")
    parts = [part.strip() for part in visible.split("/") if part.strip() not in ("", ".", "..")]
    suggestion = "_".join(parts).lstrip(".").strip()
    suggestion = suggestion.encode("utf-8")[:MAX_SAMPLE_ID_BYTES].decode("utf-8", "ignore").strip()
    return suggestion if suggestion and sample_id_problem(suggestion) is None else None


def _file_name_key(sample_id: str) -> str:
    """What a case-insensitive, normalization-insensitive file system sees of a name."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", sample_id).casefold())


def _colliding_ids(sample_ids: list[str]) -> dict[str, list[str]]:
    """Each id whose file names clash with another id's (`a` and `A`) -> all ids of its group, sorted."""
    groups: dict[str, list[str]] = {}
    for sample_id in sample_ids:
        groups.setdefault(_file_name_key(sample_id), []).append(sample_id)
    return {sample_id: sorted(group) for group in groups.values() if len(group) > 1 for sample_id in group}


def _quoted_list(items: list[str]) -> str:
    quoted = [repr(item) for item in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def read_meta(meta_path: str | os.PathLike, image_root: str | os.PathLike | None = None,
              max_references: int = MAX_REFERENCES, invalid: dict[str, str] | None = None) -> list[Sample]:
    """Read a meta JSON (`sample_id -> {img_paths, prompt, ...}`) into samples in sorted-key order.

    `img_paths` resolve against `image_root` (default: the meta file's folder); relative
    hidden-state paths against the meta file's folder. Only the first `max_references` images
    are kept, as in the reference, but dropping any is warned about. Images are not opened.
    With ``invalid`` (a dict), a malformed sample is left out and its error stored there under its
    id (``on_error=skip``) instead of raised; a malformed file is always raised. Sample ids must be
    safe file names (`sample_id_problem`), and ids naming the same file on a case-insensitive file
    system (`a` and `A`) are all refused.
    """
    meta_path = Path(meta_path)
    meta_folder = meta_path.parent
    image_root = meta_folder if image_root is None else Path(image_root)
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise BindWeaveInputError(
            f"Meta file {meta_path}: the top level is a {_json_type(meta)}, but it must be an "
            f'object mapping sample ids to samples, e.g. {{"case_1": {{"img_paths": ["a.jpg"], '
            f'"prompt": "..."}}}}.'
        )
    if not meta:
        raise BindWeaveInputError(
            f"Meta file {meta_path} holds no samples: add at least one "
            f'"sample_id": {{"img_paths": [...], "prompt": "..."}}.'
        )
    samples = []
    colliding = _colliding_ids(list(meta))
    for sample_id in sorted(meta):
        try:
            sample = _parse_sample(meta_path, sample_id, meta[sample_id], image_root, meta_folder, max_references)
            if sample_id in colliding:
                raise BindWeaveInputError(
                    f"Meta file {meta_path}, sample {sample_id!r}: the sample ids "
                    f"{_quoted_list(colliding[sample_id])} differ only in letter case or Unicode form, so they "
                    f"name the same output files ({_ID_NAMES_FILES}) on a case-insensitive file system: "
                    f"rename the keys in the meta JSON so that they differ otherwise."
                )
            samples.append(sample)
        except BindWeaveInputError as error:
            if invalid is None:
                raise
            invalid[sample_id] = str(error)
    return samples


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise BindWeaveInputError(f"Meta file {path} does not exist: check the path.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BindWeaveInputError(
            f"Meta file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
            f"{exc.colno}. Fix the file there (a missing comma or quote is the usual cause)."
        ) from None
    except UnicodeDecodeError as exc:
        raise BindWeaveInputError(
            f"Meta file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it "
            f"as UTF-8."
        ) from None
    except OSError as exc:
        raise BindWeaveInputError(f"Meta file {path} cannot be read ({exc.strerror}): check its "
                                  f"permissions.") from None


def _parse_sample(meta_path: Path, sample_id: str, entry: object, image_root: Path,
                  meta_folder: Path, max_references: int) -> Sample:
    where = f"Meta file {meta_path}, sample {sample_id!r}"
    require_safe_sample_id(sample_id, where)
    if not isinstance(entry, dict):
        raise BindWeaveInputError(
            f"{where}: the sample is a {_json_type(entry)}, but it must be an object with "
            f'"img_paths" and "prompt".'
        )
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BindWeaveInputError(
            f'{where}: field "prompt" is missing or empty: give the sample a non-empty text '
            f'prompt.'
        )
    img_paths = entry.get("img_paths")
    if not isinstance(img_paths, list) or not img_paths:
        raise BindWeaveInputError(
            f'{where}: field "img_paths" must be a non-empty list of image paths (relative to '
            f'{image_root}), e.g. ["Images/man.png"]; got {img_paths!r}.'
        )
    if not all(isinstance(p, str) and p for p in img_paths):
        raise BindWeaveInputError(
            f'{where}: field "img_paths" must hold only non-empty path strings; got '
            f'{img_paths!r}.'
        )
    if len(img_paths) > max_references:
        warnings.warn(
            f"{where}: it lists {len(img_paths)} reference images but the model uses at most "
            f"{max_references}; dropping {img_paths[max_references:]}. Reorder img_paths if "
            f"another subset matters more."
        )
    seed = entry.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BindWeaveInputError(f'{where}: field "seed" must be an integer; got {seed!r}.')
    return Sample(
        sample_id=sample_id,
        prompt=prompt,
        image_paths=tuple(image_root / p for p in img_paths[:max_references]),
        hidden_states_path=_optional_path(entry, "hidden_states_path", meta_folder, where),
        hidden_states_path_negative=_optional_path(entry, "hidden_states_path_negative",
                                                   meta_folder, where),
        seed=seed,
        fields=entry,
    )


def _optional_path(entry: dict, key: str, base: Path, where: str) -> Path | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BindWeaveInputError(f'{where}: field "{key}" must be a path string; got {value!r}.')
    return base / value


def _json_type(value: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def load_reference_image(path: str | os.PathLike,
                         max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a reference image fully and return it in RGB.

    CMYK, palette, grayscale and 16-bit images are converted; transparent areas become black.
    EXIF orientation is deliberately not applied: the reference does not apply it either.
    Images over `max_pixels` are refused (PIL's own decompression-bomb limit, about 179
    megapixels, still applies above that).
    """
    path = Path(path)
    if not path.is_file():
        raise BindWeaveInputError(f"Reference image {path} does not exist: check img_paths and "
                                  f"the image root folder.")
    if path.stat().st_size == 0:
        raise BindWeaveInputError(f"Reference image {path} is empty (0 bytes): copy or download "
                                  f"it again.")
    try:
        with warnings.catch_warnings():
            # The max_pixels check below replaces PIL's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise _image_too_large(path, f"{width}x{height}", max_pixels)
                # load() decodes the whole file here, so truncation is caught here too.
                image.load()
                return to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise _image_too_large(path, str(exc), max_pixels) from None
    except UnidentifiedImageError:
        raise BindWeaveInputError(
            f"Reference image {path} is not an image PIL can read (wrong extension, or not an "
            f"image at all): replace it with a JPEG or PNG."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BindWeaveInputError(
            f"Reference image {path} could not be decoded ({exc}): it is truncated, damaged or "
            f"in an unusual format. Re-export it as an 8-bit JPEG or PNG."
        ) from None


def _image_too_large(path: Path, size: str, max_pixels: int) -> BindWeaveInputError:
    return BindWeaveInputError(
        f"Reference image {path} is too large ({size}; the limit is {max_pixels:,} pixels). "
        f"Downscale it (it is shrunk to 1280x720 anyway) or raise the pixel limit."
    )


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert clips 16-bit samples at 255 (a white image); scale them to 8 bits.
        samples = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.round(np.clip(samples, 0, 65535) / 257).astype(np.uint8))
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # References are pasted onto a black canvas (SPEC §5): transparent areas become black
        # so that they blend into it instead of showing whatever colour hides under alpha 0.
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (0, 0, 0))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def load_hidden_states(path: str | os.PathLike, *, negative: bool = False,
                       hidden_dim: int = QWEN_HIDDEN_DIM) -> torch.Tensor:
    """Load Qwen2.5-VL hidden states as `[1, L, hidden_dim]` on the CPU.

    A `.safetensors` file is the project's format (tensors `positive` and `negative`;
    `negative` picks one). Any other file is read as an official `torch.save` of one tensor,
    with `weights_only=True` (never unpickling code); `negative` is then ignored because the
    official negative states are a separate file.
    """
    path = Path(path)
    if not path.is_file():
        raise BindWeaveInputError(f"Hidden-states file {path} does not exist: check the path, or "
                                  f"run stage 2 (python launch/extract.py) to make it.")
    if path.suffix == ".safetensors":
        value = _read_safetensors_tensor(path, "negative" if negative else "positive")
    else:
        value = _read_torch_tensor(path)
    return as_hidden_states(value, f"Hidden-states file {path}", hidden_dim)


def _read_safetensors_tensor(path: Path, key: str) -> torch.Tensor:
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            if key not in file.keys():
                raise BindWeaveInputError(
                    f"Hidden-states file {path} has no tensor {key!r} (it has "
                    f"{list(file.keys())}): re-run stage 2 (python launch/extract.py) to rewrite it."
                )
            return file.get_tensor(key)
    except (SafetensorError, OSError) as exc:
        raise BindWeaveInputError(
            f"Hidden-states file {path} is not a readable safetensors file ({exc}): re-run "
            f"stage 2 (python launch/extract.py) to rewrite it."
        ) from None


def _read_torch_tensor(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise BindWeaveInputError(
            f"Hidden-states file {path} was refused by the safe loader "
            f"({_weights_only_reason(exc)}): arbitrary pickled objects are never unpickled, as "
            f"that can run code. The file must hold one bare tensor: re-save it with "
            f"torch.save(tensor, path), or write the project's safetensors format."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise BindWeaveInputError(
            f"Hidden-states file {path} could not be read as a torch.save file ({exc}): it is "
            f"damaged or in another format. Re-run stage 2 (python launch/extract.py)."
        ) from None


def _weights_only_reason(exc: pickle.UnpicklingError) -> str:
    """The one line of torch's long weights_only message that says what was found."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    detail = text.split(marker, 1)[1] if marker in text else text
    return next((line.strip() for line in detail.splitlines() if line.strip()), "unreadable")


def as_hidden_states(value: object, where: str, hidden_dim: int) -> torch.Tensor:
    """Check one hidden-states tensor and return it as `[1, L, hidden_dim]`."""
    if not isinstance(value, torch.Tensor):
        raise BindWeaveInputError(f"{where} holds a {type(value).__name__}, not a tensor: it must "
                                  f"hold one [L, {hidden_dim}] or [1, L, {hidden_dim}] tensor.")
    if value.dtype not in HIDDEN_STATES_DTYPES:
        raise BindWeaveInputError(f"{where} has dtype {value.dtype}; expected bfloat16, float16 "
                                  f"or float32 hidden states.")
    if value.ndim == 2:
        value = value.unsqueeze(0)
    if value.ndim != 3 or value.shape[0] != 1 or value.shape[2] != hidden_dim or value.shape[1] < 1:
        raise BindWeaveInputError(
            f"{where} has shape {list(value.shape)}; expected [L, {hidden_dim}] or "
            f"[1, L, {hidden_dim}] with L >= 1 (the last layer of Qwen2.5-VL-7B for one sample)."
            + _width_mismatch_hint(value, hidden_dim))
    if not torch.isfinite(value).all():
        raise BindWeaveInputError(f"{where} contains NaN or infinite values: re-run stage 2 "
                                  f"(python launch/extract.py) for this sample.")
    return value


def _width_mismatch_hint(value: torch.Tensor, hidden_dim: int) -> str:
    """Why the width can differ: states and DiT come from different model sizes."""
    width = value.shape[-1] if value.ndim in (2, 3) else None
    if width is None or width == hidden_dim:
        return ""
    if width == QWEN_HIDDEN_DIM:
        return (f" These are Qwen2.5-VL-7B states ({QWEN_HIDDEN_DIM} wide), but this DiT's text projector takes "
                f"{hidden_dim} (its config.json mllm_dim: a tiny or other test model): use the real weights "
                "(model=bindweave_14b), or states from the same tiny set (stage 2 with qwen=tiny).")
    return (f" This DiT's text projector takes {hidden_dim}-wide states (its config.json mllm_dim) but these are "
            f"{width} wide: they were extracted with another Qwen model; re-run stage 2 with the matching one "
            "(qwen=qwen2_5_vl_7b for model=bindweave_14b).")


def load_sample_hidden_states(sample: Sample, hidden_dim: int = QWEN_HIDDEN_DIM
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a sample's `(positive, negative)` hidden states, each `[1, L, hidden_dim]`.

    A project safetensors file given as `hidden_states_path` alone supplies both.
    """
    positive_path = sample.hidden_states_path
    negative_path = sample.hidden_states_path_negative
    if positive_path is None:
        raise _missing_hidden_states(sample, "hidden_states_path")
    if negative_path is None:
        if positive_path.suffix != ".safetensors":
            raise _missing_hidden_states(sample, "hidden_states_path_negative")
        negative_path = positive_path
    return (load_hidden_states(positive_path, hidden_dim=hidden_dim),
            load_hidden_states(negative_path, negative=True, hidden_dim=hidden_dim))


def _missing_hidden_states(sample: Sample, key: str) -> BindWeaveInputError:
    return BindWeaveInputError(
        f'Sample {sample.sample_id!r} has no "{key}": run stage 2 (python launch/extract.py) '
        f"on this meta file first, and use the meta file it writes."
    )


def save_hidden_states(path: str | os.PathLike, positive: torch.Tensor, negative: torch.Tensor,
                       metadata: dict[str, str]) -> None:
    """Write positive `[1, L, D]` and negative `[1, L', D]` states to one safetensors file,
    atomically, with string `metadata` (e.g. model name, prompt) in its header.
    """
    path = Path(path)
    hidden_dim = positive.shape[-1]
    tensors = {
        name: as_hidden_states(tensor, f"Hidden states {name!r} for {path}", hidden_dim)
        .detach().cpu().contiguous()
        for name, tensor in (("positive", positive), ("negative", negative))
    }
    with atomic_write(path) as temp_path:
        save_file(tensors, temp_path, metadata=metadata)
