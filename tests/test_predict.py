"""Prediction as users run it: names that never collide, nothing overwritten, any image format,
any size, the Python API's inputs, and the working resolution."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from densemtl.cli import main as cli
from densemtl.images import as_image_batch, upsample_decode, working_size
from densemtl.io import read_image
from densemtl.models import load_model, save_model
from densemtl.tasks import get_task

from model_utils import randomise_, tiny

TASKS = {"semseg": {"channels": 5}, "depth": None}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = randomise_(tiny(TASKS)).eval()
    with torch.no_grad():  # depths of a few metres (a random head predicts "infinitely far")
        for conv in model.decoders["depth"].side.values():
            conv.bias += 300.0
    model.input_size = (48, 64)  # "trained" at 48x64
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(model, path)
    return path


def photo(h: int = 60, w: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth colour image (uint8) with some structure."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    g = np.random.default_rng(seed)
    img = np.stack([np.sin(6 * xx + g.uniform(0, 3)), np.cos(5 * yy), xx * yy], -1)
    return ((img - img.min()) / (np.ptp(img) + 1e-9) * 255).astype(np.uint8)


def run(*args) -> int:
    return cli(["predict", *map(str, args)])


def test_inputs_with_the_same_stem_get_their_own_outputs(ckpt, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(photo(seed=1)).save(src / "img.jpg")
    Image.fromarray(photo(seed=2)).save(src / "img.png")
    (src / "sub").mkdir()
    Image.fromarray(photo(seed=3)).save(src / "sub" / "img.png")
    assert run("--ckpt", ckpt, "--input", src, "--output", out) == 0
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(f"{name}.{t}.{k}" for name in ("img.jpg", "img.png", "sub/img.png")
                             for t in TASKS for k in ("png", "npy"))
    a, b = np.load(out / "img.jpg.depth.npy"), np.load(out / "img.png.depth.npy")
    assert a.shape == b.shape == (60, 80) and not np.array_equal(a, b)
    assert "predicted 3 of 3 image(s) (semseg, depth): wrote 12 files" in capsys.readouterr().out


def test_existing_outputs_are_never_overwritten_unasked(ckpt, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    Image.fromarray(photo()).save(src / "x.png")
    out.mkdir()
    (out / "x.png.depth.png").write_bytes(b"mine")
    assert run("--ckpt", ckpt, "--input", src, "--output", out) == 1
    err = capsys.readouterr().err
    assert "1 of the 4 output files exist already" in err and "--overwrite" in err
    assert (out / "x.png.depth.png").read_bytes() == b"mine"
    assert sorted(p.name for p in out.iterdir()) == ["x.png.depth.png"]  # nothing else written
    assert run("--ckpt", ckpt, "--input", src, "--output", out, "--overwrite") == 0
    assert np.asarray(Image.open(out / "x.png.depth.png")).shape == (60, 80, 3)


@pytest.mark.parametrize("where", ["same", "inside"])
def test_an_output_folder_inside_the_input_is_refused(ckpt, tmp_path, capsys, where):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo()).save(src / "x.png")
    out = src if where == "same" else src / "predictions"
    assert run("--ckpt", ckpt, "--input", src, "--output", out) == 1
    err = capsys.readouterr().err
    assert "is inside the input folder" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in src.iterdir()) == ["x.png"]
    # a single input file next to the output is fine
    assert run("--ckpt", ckpt, "--input", src / "x.png", "--output", src / "pred") == 0


def test_tiny_images_and_working_sizes(ckpt, tmp_path):
    model = load_model(ckpt)
    seen = []
    model.encoder.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape[-2:])))
    tiny_img = photo(10, 10)
    out = model.predict(tiny_img)
    assert out["semseg"].shape == (10, 10) and out["depth"].shape == (1, 10, 10)
    assert seen[-1] == (32, 32)  # enlarged to the network's minimum (2 x stride 16)
    model.predict(photo(480, 640))
    assert seen[-1] == (48, 64)  # the training resolution's number of pixels, aspect kept
    model.predict(photo(640, 480))
    assert seen[-1] == (64, 48)
    model.predict(photo(30, 40))
    assert seen[-1] == (32, 43)  # never enlarged beyond what the network needs
    model.predict(photo(480, 640), max_side=160)
    assert seen[-1] == (120, 160)
    model.predict(photo(480, 640), size=(96, 100))
    assert seen[-1] == (96, 100)
    # through the command line: --max-side, and the pixel budget
    src = tmp_path / "x.png"
    Image.fromarray(photo(300, 400)).save(src)
    assert run("--ckpt", ckpt, "--input", src, "--output", tmp_path / "o", "--max-side",
               "200") == 0
    assert np.load(tmp_path / "o" / "x.png.depth.npy").shape == (300, 400)
    assert run("--ckpt", ckpt, "--input", src, "--output", tmp_path / "p", "--size", "300x400",
               "--max-pixels", "100000") == 1
    assert not (tmp_path / "p").exists()


def test_working_size_rules():
    assert working_size((3000, 4000), area_of=(512, 1024)) == (627, 836)
    assert working_size((3000, 4000), max_side=1000) == (750, 1000)
    assert working_size((100, 200)) == (100, 200)
    assert working_size((10, 300), minimum=32) == (32, 960)
    assert working_size((10, 300), exact=(7, 9)) == (7, 9)


def test_outputs_are_resized_back_exactly_in_strips():
    """Strip-wise grid sampling == one full bilinear resize (align_corners=True), decoded."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 5, 7, 9, generator=g)
    task = get_task("semseg")
    full = task.decode(torch.nn.functional.interpolate(raw, size=(40, 50), mode="bilinear",
                                                       align_corners=True))
    strips = upsample_decode(task, raw, (40, 50), max_elements=2 * 5 * 50 * 3)  # 3 rows each
    assert torch.equal(strips, full)
    depth = get_task("depth")
    raw1 = torch.rand(1, 1, 5, 6, generator=g) * 1000 + 10
    torch.testing.assert_close(
        upsample_decode(depth, raw1, (23, 31), max_elements=31 * 4),
        depth.decode(torch.nn.functional.interpolate(raw1, size=(23, 31), mode="bilinear",
                                                     align_corners=True)))


# --- input formats ----------------------------------------------------------------------------

def test_16_and_32_bit_images_are_scaled_by_their_bit_depth(ckpt, tmp_path):
    grey8 = photo()[..., 0]
    grey16 = grey8.astype(np.uint16) * 257  # the same picture at 16 bits
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    a, b = read_image(tmp_path / "g16.png"), read_image(tmp_path / "g8.png")
    assert a.shape == (60, 80, 3) and a.max() < 1.0  # not an all-white image
    np.testing.assert_allclose(a, b, atol=1e-6)
    colour16 = photo().astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "c16.tif", colour16)
    np.testing.assert_allclose(read_image(tmp_path / "c16.tif"), photo() / 255.0, atol=1e-6)
    tifffile.imwrite(tmp_path / "f32.tif", grey8.astype(np.float32) / 255.0)
    np.testing.assert_allclose(read_image(tmp_path / "f32.tif")[..., 1], grey8 / 255.0,
                               atol=1e-6)
    tifffile.imwrite(tmp_path / "u32.tif", grey8.astype(np.uint32) * 16843009)  # 32-bit grey
    np.testing.assert_allclose(read_image(tmp_path / "u32.tif")[..., 2], grey8 / 255.0,
                               atol=1e-6)
    model = load_model(ckpt)
    p16, p8 = model.predict(tmp_path / "g16.png"), model.predict(tmp_path / "g8.png")
    torch.testing.assert_close(p16["depth"], p8["depth"])


def test_exif_orientation_and_palette_images(tmp_path):
    img = photo(30, 50)
    exif = Image.Exif()
    exif[274] = 6  # stored sideways: the viewer rotates it 90 degrees clockwise
    Image.fromarray(img).save(tmp_path / "r.jpg", exif=exif, quality=100, subsampling=0)
    upright = read_image(tmp_path / "r.jpg")
    assert upright.shape == (50, 30, 3)
    np.testing.assert_allclose(upright, np.rot90(img, -1) / 255.0, atol=0.06)
    Image.fromarray(img).quantize(64).save(tmp_path / "p.png")
    pal = read_image(tmp_path / "p.png")
    assert pal.shape == (30, 50, 3)
    np.testing.assert_allclose(pal, np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
                               / 255.0)
    Image.fromarray(np.dstack([img, np.full(img.shape[:2], 9, np.uint8)])).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), img / 255.0)  # alpha dropped


def test_the_api_takes_paths_pil_numpy_and_tensors(ckpt, tmp_path):
    model = load_model(ckpt)
    img = photo()
    Image.fromarray(img).save(tmp_path / "x.png")
    ref = model.predict(torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    for x in (tmp_path / "x.png", str(tmp_path / "x.png"), Image.fromarray(img), img,
              img.astype(np.uint16) * 257, img / 255.0, torch.from_numpy(img).permute(2, 0, 1)):
        got = model.predict(x)
        assert got["semseg"].shape == (60, 80)
        torch.testing.assert_close(got["depth"], ref["depth"], atol=1e-5, rtol=1e-4)
    batch = model.predict([img, img])
    assert batch["semseg"].shape == (2, 60, 80)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]; this one holds 0 to 25[45] "
                                         r"\(8-bit values\? divide by 255"):
        model.predict(torch.from_numpy(img).permute(2, 0, 1).float())
    with pytest.raises(ValueError, match=r"\[3,H,W\] or \[B,3,H,W\]"):
        model.predict(torch.rand(4, 5))
    with pytest.raises(TypeError, match="cannot predict from a dict"):
        model.predict({"image": img})
    x, single = as_image_batch(torch.zeros(2, 3, 4, 5, dtype=torch.uint8))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 5) and not single
