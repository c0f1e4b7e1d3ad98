from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlfeat.data.decode import DecodeError, decode_image


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
            img.draft(None, (57, 57))  # Scene15's JPEGs are over twice 57 px: decoded at reduced scale, as tlfeat does
            expected = np.asarray(img.convert("RGB").resize((57, 57), Image.BILINEAR))
        np.testing.assert_array_equal(decode_image(path, 57), expected, err_msg=str(path))


def test_sixteen_bit_grey_is_rescaled_not_clipped(tmp_path: Path) -> None:
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    path = _save(Image.fromarray(ramp), tmp_path / "deep.png")
    pixels = decode_image(path, 64)
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
    assert 100 < pixels[32, 32, 0] < 160


def test_float_images_in_zero_to_one_span_the_grey_range(tmp_path: Path) -> None:
    # Before: a float TIFF of values in [0, 1] was divided by 255 too: a black picture.
    ramp = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    pixels = decode_image(_save(Image.fromarray(ramp, "F"), tmp_path / "unit.tif"), 64)
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255


def test_transparent_pixels_are_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    pixels = decode_image(_save(img, tmp_path / "clear.png"), 8)
    assert (pixels == 255).all()


@pytest.mark.parametrize("mode, key", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_colour_key_is_transparency_too(tmp_path: Path, mode: str, key: object) -> None:
    # Before: a grey or RGB PNG's tRNS colour key was ignored: its transparent pixels decoded black, not white.
    half = np.full((8, 8), 128, np.uint8)
    half[:, :4] = 0
    img = Image.fromarray(half).convert(mode)
    path = tmp_path / "keyed.png"
    img.save(path, transparency=key)
    pixels = decode_image(path, 8)
    assert (pixels[:, :4] == 255).all() and (pixels[:, 4:] == 128).all()


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


def test_a_large_jpeg_is_limited_by_the_pixels_it_decodes_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: a 108-megapixel phone photo (over Pillow's warning limit) was refused by its header size, with
    # Pillow's two-line warning on stderr, although it decodes at 1/8 scale; the same limits, scaled down:
    import warnings

    import tlfeat.data.decode

    monkeypatch.setattr(tlfeat.data.decode, "MAX_PIXELS", 200 * 200)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200)  # Pillow warns above it (raises above twice it)
    photo = _save(Image.new("RGB", (256, 256), (200, 30, 30)), tmp_path / "photo.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning escapes
        assert decode_image(photo, 32)[0, 0, 0] > 150  # decoded at 1/8: 32 x 32
    with pytest.raises(DecodeError, match="image too large"):  # a PNG is decoded whole: refused as before
        decode_image(_save(Image.new("RGB", (256, 256)), tmp_path / "big.png"), 32)
    # Before: over twice Pillow's limit, Image.open itself refused it (a 400-megapixel JPEG, 6 at 1/8 scale).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
    assert decode_image(photo, 32)[0, 0, 0] > 150
    assert Image.MAX_IMAGE_PIXELS == 100 * 100  # Pillow's own limit is left as it was


def _full_scale(path: Path, size: int) -> np.ndarray:
    """The decoding of tlfeat before JPEG DCT scaling: full-size decode, then the same resize."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))


def _photo(width: int, height: int) -> Image.Image:
    """A smooth colour picture with fine texture, like a photo (noise alone would be unlike one)."""
    rng = np.random.default_rng(width * height)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(2 * np.pi * (rng.uniform(1, 6) * xx + rng.uniform(1, 6) * yy)) for _ in range(3)]
    pixels = 128 + 90 * np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 1))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_jpeg_dct_scaling_only_from_twice_the_target_size(tmp_path: Path) -> None:
    """Below 2x in either side a JPEG decodes exactly as before; from 2x it decodes at reduced scale, close to it."""
    below = _save(_photo(447, 600), tmp_path / "below.jpg", quality=90)  # 447 < 2 x 224
    np.testing.assert_array_equal(decode_image(below, 224), _full_scale(below, 224))
    png = _save(_photo(1024, 768), tmp_path / "large.png")  # not a JPEG: never scaled
    np.testing.assert_array_equal(decode_image(png, 224), _full_scale(png, 224))
    large = _save(_photo(1024, 768), tmp_path / "large.jpg", quality=90)
    scaled, full = decode_image(large, 224).astype(np.int16), _full_scale(large, 224).astype(np.int16)
    assert not np.array_equal(scaled, full)  # the reduced-scale decode did happen
    assert np.abs(scaled - full).mean() < 2.0  # and still shows the same picture


def test_a_broken_symbolic_link_is_named_as_one(tmp_path: Path) -> None:
    # Before: "file disappeared during the run", for a link that never pointed anywhere.
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(DecodeError, match="^broken symbolic link$"):
        decode_image(tmp_path / "link.jpg", 32)
