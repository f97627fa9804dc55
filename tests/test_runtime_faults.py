"""The runtime against damaged exports and bad inputs: one `RecipeError` line naming the file, flag or key,
never a traceback, and never a file opened outside the export directory."""

from __future__ import annotations

import copy
import json
import random
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tokcompile.cli import generate_main
from tokcompile.errors import RecipeError
from tokcompile.runtime import load


@pytest.fixture()
def export(demo_export, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(demo_export, out)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray((np.random.default_rng(1).random((40, 50, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def _manifest(export) -> dict:
    return json.loads((export / "manifest.json").read_text())


def _write(export, manifest) -> None:
    (export / "manifest.json").write_text(json.dumps(manifest))


EAGER = ("--backend", "eager", "--trust-export")


def _cli(capsys, *args: str) -> str:
    code = generate_main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("edit, expect", [
    (lambda m: [1, 2], "holds a JSON list, not an object"),
    (lambda m: {k: v for k, v in m.items() if k != "graphs"}, "'graphs' is missing"),
    (lambda m: {**m, "format_version": "1"}, "format_version '1', which is not an integer"),
    (lambda m: {**m, "layout": {**m["layout"], "cache_groups": 5}}, "is damaged"),
    (lambda m: {**m, "generation": {"batch_max": "x"}}, "is damaged"),
])
def test_damaged_manifest(export, edit, expect):
    _write(export, edit(_manifest(export)))
    with pytest.raises(RecipeError, match=expect) as info:
        load(export, "onnxruntime")
    assert "manifest.json" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("where, name", [
    ("processor", "../../etc"),
    ("file", "../../etc/hostname"),
    ("file", "/etc/hostname"),
    ("file", "processor/../../outside.onnx"),
])
def test_manifest_cannot_name_files_outside_the_export(export, where, name, tmp_path):
    (tmp_path / "outside.onnx").write_bytes(b"x")  # exists, so only the containment check refuses it
    m = _manifest(export)
    if where == "processor":
        m["processor"] = name
    else:
        m["graphs"]["prefill"]["artifacts"]["onnx"]["files"][0] = name
    _write(export, m)
    with pytest.raises(RecipeError, match="outside the export directory"):
        load(export, "onnxruntime")


def test_linked_file_pointing_outside_is_refused(export, tmp_path):
    target = tmp_path / "elsewhere.onnx"
    shutil.copy(export / "decode.onnx", target)
    (export / "decode.onnx").unlink()
    (export / "decode.onnx").symlink_to(target)
    with pytest.raises(RecipeError, match="decode.onnx' outside the export directory"):
        load(export, "onnxruntime")


def test_weights_corrupted_at_the_same_size(export, image):
    data = export / "weights.onnx.data"  # the one weight file all graphs read
    raw = np.frombuffer(data.read_bytes(), dtype=np.uint8).copy()
    raw[:] = np.random.default_rng(0).integers(0, 256, raw.size, dtype=np.uint8)
    data.write_bytes(raw.tobytes())
    gen = load(export, "onnxruntime")  # sizes match: only the sha256 check sees it
    try:
        gen.generate([image], ["What is this?"], max_new_tokens=2)
    except RecipeError as e:  # random weights usually break an index; then the error suggests --verify
        assert "graph failed to run" in str(e) and "--verify" in str(e) and "\n" not in str(e)
    with pytest.raises(RecipeError, match="weights.onnx.data: does not match its sha256"):
        load(export, "onnxruntime", verify=True)


def _png_header_only(path, width: int, height: int) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_bad_images(demo_export, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    _png_header_only(bomb, 20000, 20000)
    err = _cli(capsys, str(demo_export), *EAGER, "--image", str(bomb), "--prompt", "hi")
    assert "--image" in err and "too large to decode safely" in err
    err = _cli(capsys, str(demo_export), *EAGER, "--image", str(tmp_path), "--prompt", "hi")
    assert "is a directory" in err
    (tmp_path / "text.png").write_text("not an image")
    err = _cli(capsys, str(demo_export), *EAGER, "--image", str(tmp_path / "text.png"), "--prompt", "hi")
    assert "is not a readable image" in err


@pytest.mark.parametrize("flags, key", [
    (("--temperature", "nan"), "--temperature"),
    (("--temperature", "-1"), "--temperature"),
    (("--temperature", "inf"), "--temperature"),
    (("--top-p", "0"), "--top-p"),
    (("--top-p", "1.5"), "--top-p"),
    (("--max-new-tokens", "0"), "--max-new-tokens"),
])
def test_bad_sampling_flags(demo_export, image, capsys, flags, key):
    err = _cli(capsys, str(demo_export), *EAGER, "--image", image, "--prompt", "hi", *flags)
    assert err.startswith(f"error: {key}: ")


def test_manifest_fuzz(export):
    """Random damage to the manifest's values: every outcome is a load or one RecipeError line."""
    base = _manifest(export)
    rng = random.Random(7)
    awkward = [None, 0, -1, "x", "../x", [], {}, [1], {"a": 1}, 1e300, True]

    def paths(node, prefix=()):
        yield prefix
        if isinstance(node, dict):
            for k, v in node.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                yield from paths(v, prefix + (i,))

    sites = [p for p in paths(base) if p and p[0] in ("format_version", "graphs", "layout", "plan", "generation",
                                                      "processor", "media", "files")]
    for _ in range(40):
        m = copy.deepcopy(base)
        site = rng.choice(sites)
        node = m
        for k in site[:-1]:
            node = node[k]
        if rng.random() < 0.3:
            del node[site[-1]]
        else:
            node[site[-1]] = rng.choice(awkward)
        _write(export, m)
        try:
            load(export, "onnxruntime")
        except RecipeError as e:
            assert "\n" not in str(e) and str(e).split(":")[0], site
