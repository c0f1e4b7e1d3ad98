from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlfeat.data.decode import DecodeError, decode_image, iter_batches


def _save(img: Image.Image, path: Path, **kwargs) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "mode, ext",
    [("L", "jpg"), ("RGB", "png"), ("P", "gif"), ("RGBA", "png"), ("CMYK", "jpg"), ("I;16", "png"),
     ("LA", "png"), ("1", "bmp"), ("RGB", "webp"), ("RGB", "tiff")],
)
def test_every_mode_becomes_8bit_rgb(tmp_path: Path, mode: str, ext: str) -> None:
    img = Image.new(mode, (30, 20))
    path = _save(img, tmp_path / f"x.{ext}")
    pixels = decode_image(path, 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8


def test_grey_images_resized_in_one_channel_equal_resizing_them_as_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (97, 131), dtype=np.uint8), mode="L")
    files = [_save(grey, tmp_path / "noise.png"), _save(grey, tmp_path / "noise.jpg", quality=90)]
    scene15 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scene15" / "train"
    if scene15.is_dir():  # real grey JPEGs of odd sizes too, where the dataset is here
        files += sorted(scene15.glob("*/*.jpg"))[::150]
    for path in files:
        with Image.open(path) as img:
            assert img.mode == "L"
            expected = np.asarray(img.convert("RGB").resize((57, 57), Image.BILINEAR))
        np.testing.assert_array_equal(decode_image(path, 57), expected, err_msg=str(path))


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    pixels = decode_image(path, 64)
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
    assert 100 < pixels[32, 32, 0] < 160


def test_transparent_pixels_are_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels = decode_image(_save(img, tmp_path / "clear.png"), 8)
    assert (pixels == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    path = _save(img, tmp_path / "rotated.jpg", exif=exif, quality=95)
    pixels = decode_image(path, 20)
    top, bottom = pixels[2, 10], pixels[-3, 10]
    assert top[2] > 200 and top[0] < 60  # after rotation the blue half is on top
    assert bottom[0] > 200 and bottom[2] < 60


def test_first_frame_of_an_animation(tmp_path: Path) -> None:
    frames = [Image.new("P", (10, 10), i) for i in (1, 2, 3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert decode_image(path, 10).shape == (10, 10, 3)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"\x00\x01garbage" * 50, "not an image Pillow can read"),
        ("truncated", "corrupt or truncated"),
    ],
)
def test_bad_files_raise_one_line_reasons(tmp_path: Path, content, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    if content == "truncated":
        good = tmp_path / "good.jpg"
        Image.effect_noise((200, 200), 64).convert("RGB").save(good, quality=95)
        content = good.read_bytes()[:1500]
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=reason) as info:
        decode_image(path, 32)
    assert "\n" not in str(info.value)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tlfeat.data.decode

    monkeypatch.setattr(tlfeat.data.decode, "MAX_PIXELS", 100 * 100)
    path = _save(Image.new("L", (200, 200)), tmp_path / "big.png")
    with pytest.raises(DecodeError, match="image too large"):
        decode_image(path, 32)


def test_iter_batches_keeps_order_and_reports_failures(tmp_path: Path) -> None:
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        if i == 3:
            path.write_bytes(b"not an image")
        else:
            Image.new("L", (9, 9), i * 30).save(path)
        paths.append(path)
    batches = list(iter_batches(paths, 8, lambda x: x, batch_size=3, workers=2))
    assert [b.start for b in batches] == [0, 3, 6]
    assert batches[1].failures == [(0, "not an image Pillow can read")]
    assert batches[1].ok == [1, 2]
    assert batches[1].images[0, 0, 0, 0] == 4 * 30  # image 4, not image 3
