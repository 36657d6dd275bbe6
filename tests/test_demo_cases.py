"""The built-in demo cases (bindweave/testing/demo_cases.py)."""

from PIL import Image

from bindweave.io.inputs import load_reference_image, read_meta
from bindweave.testing.demo_cases import write_demo_cases


def all_files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_demo_cases_are_readable(tmp_path):
    samples = read_meta(write_demo_cases(tmp_path))

    assert sorted(len(s.image_paths) for s in samples) == [1, 2, 3]
    assert min(len(s.prompt.split()) for s in samples) < 15
    assert max(len(s.prompt.split()) for s in samples) > 80
    paths = {p for s in samples for p in s.image_paths}
    assert all(load_reference_image(p).mode == "RGB" for p in paths)
    formats, modes, sizes = set(), set(), set()
    for path in paths:
        with Image.open(path) as image:
            formats.add(image.format), modes.add(image.mode), sizes.add(image.size)
    assert formats == {"PNG", "JPEG"} and "RGBA" in modes and len(sizes) == len(paths)


def test_demo_cases_are_deterministic_and_not_rewritten(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    write_demo_cases(first)
    write_demo_cases(second)
    assert all_files(first) == all_files(second)

    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    write_demo_cases(first)
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == mtimes
