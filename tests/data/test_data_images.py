"""load_image: every supported input becomes 8-bit RGB with the documented intensity mapping."""
import numpy as np
import pytest
from PIL import Image

from data_fixtures import write_dicom, write_empty, write_truncated_png
from nearl.data.images import BadImageError, load_image


def _arr(im):
    assert im.mode == "RGB"
    a = np.asarray(im)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    return a


def test_rgb_png_is_returned_unchanged(tmp_path):
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(src).save(tmp_path / "a.png")
    assert np.array_equal(_arr(load_image(tmp_path / "a.png")), src)


def test_8bit_grayscale_is_replicated_not_stretched(tmp_path):
    # An 8-bit image already has display values: min-max stretching would change them.
    src = np.array([[100, 120], [140, 150]], dtype=np.uint8)
    Image.fromarray(src, mode="L").save(tmp_path / "g.png")
    a = _arr(load_image(tmp_path / "g.png"))
    for c in range(3):
        assert np.array_equal(a[:, :, c], src)


@pytest.mark.parametrize("mode", ["1", "P", "LA"])
def test_other_8bit_modes_become_rgb(tmp_path, mode):
    im = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8), mode="L").convert(mode)
    im.save(tmp_path / "m.png")
    a = _arr(load_image(tmp_path / "m.png"))
    assert a[0, 0].tolist() == [0, 0, 0] and a[0, 1].tolist() == [255, 255, 255]


def _ramp_with_outliers(dtype):
    # 100x100 ramp 1000..3000 plus 10 hot and 10 cold pixels (0.1 % each): robust scaling must
    # ignore them, i.e. map the ramp itself onto 0..255.
    a = np.linspace(1000, 3000, 10000).reshape(100, 100).astype(dtype)
    a.flat[:10] = 60000
    a.flat[-10:] = 0
    return a


def _check_robust_ramp(a):
    g = a[:, :, 0].astype(int)
    assert g.min() == 0 and g.max() == 255
    # the ramp's median sits mid-range; plain min-max over the outliers would put it near 8,
    # a low percentile of 0 near 170, a high one of 100 near 4
    assert 120 <= np.median(g) <= 136
    assert np.all(np.diff(g.flat[10:-10]) >= 0)  # order preserved
    assert g.flat[20] < 10 and g.flat[-20] > 245  # the ramp's ends reach the ends of the range


def test_16bit_png_is_robustly_scaled(tmp_path):
    Image.fromarray(_ramp_with_outliers(np.uint16)).save(tmp_path / "d.png")  # a real 16-bit PNG
    with Image.open(tmp_path / "d.png") as im:
        assert im.mode.startswith("I")
    _check_robust_ramp(_arr(load_image(tmp_path / "d.png")))


@pytest.mark.parametrize("dtype, mode", [(np.uint16, "I;16"), (np.int32, "I"), (np.float32, "F")])
def test_high_bit_depth_tiff_is_robustly_scaled(tmp_path, dtype, mode):
    Image.fromarray(_ramp_with_outliers(dtype)).save(tmp_path / "x.tif")
    with Image.open(tmp_path / "x.tif") as im:
        assert im.mode == mode
    _check_robust_ramp(_arr(load_image(tmp_path / "x.tif")))


def test_constant_16bit_image_does_not_divide_by_zero(tmp_path):
    Image.fromarray(np.full((4, 4), 700, dtype=np.uint16)).save(tmp_path / "c.png")
    assert _arr(load_image(tmp_path / "c.png")).max() == 0


# Stored values -> HU = 2 * v - 1000; window centre 0, width 200 maps HU -100..100 to 0..255.
STORED = np.array([[300, 450, 500], [550, 700, 475]], dtype=np.uint16)
EXPECTED = np.array([[0, 0, 128], [255, 255, 64]], dtype=np.uint8)  # HU -400,-100,0,100,400,-50


def test_dicom_applies_rescale_and_window(tmp_path):
    p = write_dicom(tmp_path / "ct.dcm", STORED, slope=2, intercept=-1000, center=0, width=200)
    a = _arr(load_image(p))
    assert np.array_equal(a[:, :, 0], EXPECTED)
    assert np.array_equal(a[:, :, 1], a[:, :, 2])


def test_dicom_multivalued_window_uses_first(tmp_path):
    p = write_dicom(tmp_path / "ct.dcm", STORED, slope=2, intercept=-1000,
                    center=[0, 500], width=[200, 3000])
    assert np.array_equal(_arr(load_image(p))[:, :, 0], EXPECTED)


def test_dicom_monochrome1_is_inverted(tmp_path):
    p = write_dicom(tmp_path / "ct.dcm", STORED, photometric="MONOCHROME1", slope=2,
                    intercept=-1000, center=0, width=200)
    assert np.array_equal(_arr(load_image(p))[:, :, 0], 255 - EXPECTED)


def test_dicom_without_window_is_min_max_scaled(tmp_path):
    p = write_dicom(tmp_path / "mr.dcm", np.array([[0, 100], [200, 400]], dtype=np.uint16))
    # percentiles of {0,100,200,400}: 0.5 % -> 1.5, 99.5 % -> 397; so 100 -> 98.5/395.5*255 = 63.5
    assert _arr(load_image(p))[:, :, 0].tolist() == [[0, 64], [128, 255]]


def test_dicom_detected_by_magic_without_suffix(tmp_path):
    p = write_dicom(tmp_path / "IM0001", STORED, slope=2, intercept=-1000, center=0, width=200)
    assert np.array_equal(_arr(load_image(p))[:, :, 0], EXPECTED)


def test_dicom_multiframe_uses_first_frame(tmp_path):
    frames = np.stack([STORED, np.full_like(STORED, 700)])
    p = write_dicom(tmp_path / "mf.dcm", frames, slope=2, intercept=-1000, center=0, width=200)
    a = _arr(load_image(p))
    assert a.shape[:2] == STORED.shape and np.array_equal(a[:, :, 0], EXPECTED)


def test_bundled_pydicom_ct_loads():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    a = _arr(load_image(path))
    assert a.shape == (128, 128, 3) and a.std() > 20  # real content, not a flat image


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="not found") as e:
        load_image(tmp_path / "nope.png")
    assert isinstance(e.value, ValueError) and e.value.path == tmp_path / "nope.png"


def test_empty_file(tmp_path):
    with pytest.raises(BadImageError, match="empty"):
        load_image(write_empty(tmp_path / "e.png"))


def test_truncated_png(tmp_path):
    p = write_truncated_png(tmp_path / "t.png")
    with Image.open(p):  # the header alone is fine: only a full decode notices
        pass
    with pytest.raises(BadImageError, match="cannot decode"):
        load_image(p)


@pytest.mark.parametrize("name", ["junk.png", "junk.dcm"])
def test_garbage_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(b"this is not an image" * 20)
    with pytest.raises(BadImageError):
        load_image(tmp_path / name)
