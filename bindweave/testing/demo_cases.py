"""The built-in sample cases of the fresh-machine demo: reference images drawn here, with PIL.

`write_demo_cases(folder)` writes `folder/images/*` and `folder/meta.json` in the official meta
format (SPEC §2): three cases with 1, 2 and 3 references, a short and a long prompt, images of
different sizes and aspect ratios, one PNG with alpha and one JPEG. The bytes are the same on
every call, and files already holding them are not rewritten. Hidden states are made by stage 2.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from bindweave.io.outputs import atomic_write


def _draw_face() -> Image.Image:
    """A smiling cartoon face on a transparent background (RGBA, portrait 480x600)."""
    image = Image.new("RGBA", (480, 600), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((70, 110, 410, 500), fill=(246, 205, 170, 255), outline=(120, 80, 50, 255),
                 width=4)
    draw.chord((60, 70, 420, 330), 180, 360, fill=(90, 55, 30, 255))
    for eye_x in (175, 305):
        draw.ellipse((eye_x - 28, 250, eye_x + 28, 300), fill=(255, 255, 255, 255))
        draw.ellipse((eye_x - 12, 262, eye_x + 12, 290), fill=(40, 90, 160, 255))
    draw.polygon([(240, 300), (222, 370), (258, 370)], fill=(225, 170, 140, 255))
    draw.arc((160, 340, 320, 450), 20, 160, fill=(170, 40, 50, 255), width=8)
    return image


def _draw_dog() -> Image.Image:
    """A small brown dog on a grass-green background (RGB, landscape 800x560)."""
    image = Image.new("RGB", (800, 560), (120, 190, 110))
    draw = ImageDraw.Draw(image)
    brown, dark = (150, 95, 50), (80, 50, 25)
    draw.ellipse((230, 240, 560, 420), fill=brown)
    for leg_x in (260, 330, 450, 510):
        draw.rectangle((leg_x, 380, leg_x + 35, 500), fill=brown)
    draw.line((550, 290, 640, 200), fill=brown, width=18)
    draw.ellipse((120, 150, 300, 320), fill=brown)
    draw.ellipse((105, 150, 160, 270), fill=dark)
    draw.ellipse((260, 150, 315, 270), fill=dark)
    draw.ellipse((170, 210, 190, 230), fill=(20, 20, 20))
    draw.ellipse((230, 210, 250, 230), fill=(20, 20, 20))
    draw.ellipse((195, 255, 225, 280), fill=(20, 20, 20))
    return image


def _draw_teapot() -> Image.Image:
    """A red teapot on a pale background (RGB, square 400x400)."""
    image = Image.new("RGB", (400, 400), (235, 232, 222))
    draw = ImageDraw.Draw(image)
    red = (200, 30, 35)
    draw.ellipse((90, 140, 310, 330), fill=red)
    draw.polygon([(110, 240), (30, 160), (50, 150), (130, 210)], fill=red)
    draw.arc((270, 170, 360, 290), 270, 90, fill=red, width=18)
    draw.rectangle((160, 115, 240, 145), fill=red)
    draw.ellipse((185, 90, 215, 120), fill=(150, 20, 25))
    draw.ellipse((140, 190, 180, 230), fill=(240, 120, 120))
    return image


def _draw_house() -> Image.Image:
    """A house under a blue sky on grass (RGB, wide 1024x576)."""
    image = Image.new("RGB", (1024, 576), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 430, 1024, 576), fill=(90, 160, 70))
    draw.rectangle((340, 250, 690, 470), fill=(240, 220, 160))
    draw.polygon([(310, 260), (515, 110), (720, 260)], fill=(150, 50, 40))
    draw.rectangle((480, 360, 550, 470), fill=(110, 70, 40))
    for window_x in (375, 595):
        draw.rectangle((window_x, 300, window_x + 60, 350), fill=(200, 230, 250),
                       outline=(255, 255, 255), width=5)
    draw.ellipse((850, 40, 950, 140), fill=(255, 220, 80))
    return image


# file name -> (drawing, PIL save options); the suffix picks the format.
_IMAGES = {
    "face.png": (_draw_face, {}),
    "dog.jpg": (_draw_dog, {"quality": 90}),
    "teapot.png": (_draw_teapot, {}),
    "house.png": (_draw_house, {}),
}

_CASES = {
    "demo_face_1": {
        "img_paths": ["images/face.png"],
        "prompt": "A cartoon boy smiles and waves at the camera.",
        "class_label": ["Man"],
    },
    "demo_dog_teapot_2": {
        "img_paths": ["images/dog.jpg", "images/teapot.png"],
        "prompt": (
            "A small brown dog with floppy dark ears trots across a sunny kitchen floor towards a "
            "shiny red teapot standing on a low wooden table. The dog stops, tilts its head "
            "curiously and sniffs the teapot's spout, its tail wagging slowly from side to side. "
            "Soft morning light falls through a window behind the table, casting long gentle "
            "shadows on the tiled floor. The camera starts at the dog's eye level and slowly "
            "pushes in as the dog nudges the teapot with its nose, then settles on a close-up of "
            "the two side by side. The mood is playful and warm, with natural colours and a "
            "calm, homely atmosphere throughout the scene."
        ),
        "class_label": ["Dog", "Teapot"],
    },
    "demo_face_dog_house_3": {
        "img_paths": ["images/face.png", "images/dog.jpg", "images/house.png"],
        "prompt": (
            "A smiling cartoon boy plays fetch with his small brown dog on the lawn in front of "
            "a cosy house with a red roof, on a bright summer afternoon."
        ),
        "class_label": ["Man", "Dog", "House"],
    },
}


def write_demo_cases(folder: Path) -> Path:
    """Write the demo images and meta JSON under `folder`; return the meta file's path."""
    folder = Path(folder)
    for name, (draw, save_options) in _IMAGES.items():
        buffer = io.BytesIO()
        draw().save(buffer, format=Image.registered_extensions()[Path(name).suffix],
                    **save_options)
        _write_if_changed(folder / "images" / name, buffer.getvalue())
    meta_path = folder / "meta.json"
    _write_if_changed(meta_path, (json.dumps(_CASES, indent=2) + "\n").encode("utf-8"))
    return meta_path


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    with atomic_write(path) as temp_path:
        temp_path.write_bytes(data)
