"""Inputs that used to give silent wrong answers: alpha planes, stacks without axes (exit 0, wrong count)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from cellsynth.cli import main


def _disks(n: int, *, shape=(96, 96), radius=4, seed=0) -> np.ndarray:
    """A plane of ``n`` separated bright disks on a dark background (uint8)."""
    from skimage.draw import disk

    rng = np.random.default_rng(seed)
    img = np.full(shape, 10, np.uint8)
    centres: list = []
    while len(centres) < n:
        c = rng.uniform(radius + 2, np.array(shape) - radius - 2)
        if all(np.hypot(*(c - d)) > 3 * radius for d in centres):
            centres.append(c)
            img[disk(tuple(c), radius, shape=shape)] = 200
    return img


def _count(capsys, path, *extra) -> dict:
    assert main(["count", str(path), "--diameter", "8", "--json", "--quiet", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model", ["classic", "default"])
@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_rgba_files_count_their_colour_not_their_alpha(tmp_path, capsys, kind, model):
    grey = _disks(12)
    rgba = np.zeros(grey.shape + (4,), np.uint8)
    rgba[..., 0], rgba[..., 3] = grey, 255  # nuclei in red, opaque
    path = tmp_path / f"rgba.{'png' if kind == 'png' else 'tif'}"
    if kind == "png":
        from skimage.io import imsave

        imsave(path, rgba, check_contrast=False)
    else:
        tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=["unassalpha"])
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    got = _count(capsys, path, "--model", model)["count"]
    assert got == _count(capsys, tmp_path / "grey.tif", "--model", model)["count"]
    assert abs(got - 12) <= 1


def test_grey_plus_alpha_png_counts_the_grey(tmp_path, capsys):
    from skimage.io import imsave

    grey = _disks(9, seed=2)
    imsave(tmp_path / "la.png", np.stack([grey, np.full_like(grey, 255)], axis=-1), check_contrast=False)
    assert abs(_count(capsys, tmp_path / "la.png", "--model", "classic")["count"] - 9) <= 1


def test_planes_written_without_axes_are_a_stack(tmp_path, capsys):
    """``tifffile.imwrite`` of 4 planes with no axes stores them as planar samples: a stack, not RGBA."""
    stack = np.stack([_disks(n, seed=n) for n in (10, 20, 30, 40)])
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    doc = _count(capsys, path, "--model", "classic")
    assert [abs(a - b) <= 1 for a, b in zip(doc["per_plane"], (10, 20, 30, 40))] == [True] * 4
    assert main(["count", str(path), "--diameter", "8", "--model", "classic", "--quiet"]) == 0
    assert "in 4 planes" in capsys.readouterr().out
    # count-batch reads the file the same way
    from cellsynth.batch.sources import open_image

    im = open_image(path)
    assert im.n_planes == 4 and im.channel_axis is None
    assert np.array_equal(np.asarray(im.plane((2,))[0]), stack[2])


def test_rgba_tiff_opened_lazily_leaves_out_alpha(tmp_path):
    from cellsynth.batch.sources import open_image, read_small_plane

    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 7, 255
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    im = open_image(tmp_path / "a.tif")
    assert im.shape == (40, 50, 3) and im.n_planes == 1
    plane, ch = im.plane(())
    assert ch == 2 and np.asarray(plane).max() == 7
    assert read_small_plane(tmp_path / "a.tif", 10**6) is None  # left to open_image
