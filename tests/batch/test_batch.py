"""Batch counting on a real dask.distributed LocalCluster, resumable results, and the lazy large-image path."""

from __future__ import annotations

import csv
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from cellsynth.batch import (BatchParams, chunk_plan, cluster_client, count_batch, count_large, find_images,
                             image_statistics, open_image)
from cellsynth.cli import main
from cellsynth.count import count_cells, load_counter

CLASSIC = BatchParams(model="classic", diameter=12.0)


def _field(seed: int, shape=(96, 112), n=None) -> np.ndarray:
    """A uint16 field of well separated nuclei (12 px) on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.normal(300, 20, shape)
    n = int(rng.integers(3, 12)) if n is None else n
    for _ in range(n):
        r, c = rng.integers(10, shape[0] - 10), rng.integers(10, shape[1] - 10)
        img[disk((r, c), 6, shape=shape)] += rng.uniform(800, 1500)
    return np.clip(img, 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def client():
    with cluster_client("local", workers=2) as c:
        yield c


def test_local_workers_keep_the_default_memory_allocator(client):
    # dask's nannies would set MALLOC_TRIM_THRESHOLD_=65536, which makes glibc map and unmap every large
    # array: counting in a worker ran 1.7x slower than in a plain process
    import os

    envs = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert "65536" not in envs.values(), envs


def test_local_cluster_bookkeeping_wakes_up_less_often_than_dasks_defaults(client):
    # with distributed's defaults (20 ms ticks, 100 ms memory checks) an idle 2-worker cluster took ~14 % of a core
    import dask

    got = client.run(lambda: (dask.config.get("distributed.admin.tick.interval"),
                              dask.config.get("distributed.worker.memory.monitor-interval")))
    assert set(got.values()) == {("200ms", "500ms")}, got
    # one task per worker thread: distributed's 1.1 gave a one-thread worker a second plane to wait behind its
    # first, and at the end of a batch one worker could hold two while the other had none
    assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.WORKER_SATURATION) == 1.0


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "in"
    (folder / "plate" / "B02").mkdir(parents=True)
    for i in range(8):
        tifffile.imwrite(folder / "plate" / f"A{i:02d}.tif", _field(i))
    tifffile.imwrite(folder / "plate" / "B02" / "A00.tif", _field(50))  # same name, other folder
    movie = np.stack([_field(100 + t, n=3 + t) for t in range(4)])
    tifffile.imwrite(folder / "movie.tif", movie, imagej=True, metadata={"axes": "TYX"})
    return folder


def _table(out: Path) -> list[dict]:
    with open(out / "counts.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _expected(folder: Path) -> dict:
    """(file name, plane) -> count by the in-process counter, as ``cellsynth count`` gives it plane by plane."""
    exp = {}
    for p in find_images([folder]):
        data = tifffile.imread(p)
        planes = data if data.ndim == 3 else data[None]
        for k, plane in enumerate(planes):
            exp[(str(p.resolve()), k)] = count_cells(plane, model="classic", diameter=12.0).count
    return exp


def test_batch_on_two_workers_survives_a_killed_worker_and_resumes(client, images, tmp_path):
    out = tmp_path / "out"
    pids = list(client.run(os.getpid).values())
    killed = []

    def progress(p):
        if p.step == 1 and not killed:  # a worker dies while the batch runs
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    res = count_batch([images], out, params=CLASSIC, scheduler=client, progress=progress)
    assert killed and res.errors == []
    assert res.counted == 13 and res.skipped == 0
    rows = _table(out)
    got = {(r["image"], int(r["plane"])): int(r["count"]) for r in rows}
    assert got == _expected(images)  # complete and correct, plane by plane
    assert sum(got.values()) > 40
    assert {r["stack_index"] for r in rows if r["image"].endswith("movie.tif")} == {"T0", "T1", "T2", "T3"}
    # one points file per image, agreeing with the table; the two A00 files do not collide
    names = sorted(p.name for p in (out / "points").glob("*.csv"))
    assert len(names) == 10 and "plate__A00.csv" in names and "plate__B02__A00.csv" in names
    with open(out / "points" / "movie.csv", newline="") as fh:
        movie = list(csv.DictReader(fh))
    per_t = np.bincount([int(r["t"]) for r in movie], minlength=4)
    assert per_t.tolist() == [int(r["count"]) for r in sorted(rows, key=lambda r: r["plane"])
                              if r["image"].endswith("movie.tif")]
    assert (out / "counts.png").read_bytes()[:4] == b"\x89PNG"

    # a re-run does no work and changes nothing
    stamps = {p: p.stat().st_mtime_ns for p in (out / ".records").glob("*.json")}
    again = count_batch([images], out, params=CLASSIC, scheduler=client)
    assert (again.counted, again.skipped, again.workers) == (0, 13, 0)
    assert {p: p.stat().st_mtime_ns for p in (out / ".records").glob("*.json")} == stamps
    assert _table(out) == rows


def test_a_fresh_batch_starts_the_cluster_before_planning_and_a_finished_one_starts_none(client, images, tmp_path,
                                                                                        monkeypatch):
    from cellsynth.batch import engine

    events = []
    real_open, real_cluster = engine.open_image, engine._ClusterInBackground

    class Recorded(real_cluster):
        def __init__(self, *args, **kwargs):
            events.append("cluster")
            super().__init__(*args, **kwargs)

    real_settings = engine._settings
    monkeypatch.setattr(engine, "open_image", lambda p: (events.append("plan"), real_open(p))[1])
    monkeypatch.setattr(engine, "_settings", lambda params: (events.append("settings"), real_settings(params))[1])
    monkeypatch.setattr(engine, "_ClusterInBackground", Recorded)
    out = tmp_path / "out"
    assert count_batch([images / "plate"], out, params=CLASSIC, scheduler=client).counted == 9
    # a new results folder: the cluster starts while the counter loads and the images are opened
    assert events[:2] == ["cluster", "settings"] and events.count("plan") == 9
    events.clear()
    again = count_batch([images / "plate"], out, params=CLASSIC, scheduler=client)
    assert again.counted == 0 and "cluster" not in events and client.status == "running"


def test_a_bad_model_is_refused_before_anything_is_written_and_the_early_cluster_closes(images, tmp_path):
    import psutil

    out = tmp_path / "new"
    with pytest.raises(FileNotFoundError, match="no counter model"):  # a typo: refused before any cluster starts
        count_batch([images / "plate"], out, params=BatchParams(model=str(tmp_path / "no-such-model")),
                    scheduler="local", workers=1)
    (tmp_path / "bad.safetensors").write_bytes(b"junk" * 10)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(ValueError, match="bad.safetensors is not a readable"):  # found out while the cluster starts
        count_batch([images / "plate"], out, params=BatchParams(model=str(tmp_path / "bad.safetensors")),
                    scheduler="local", workers=1)
    assert not out.exists()

    def ours(p):
        try:
            return "resource_tracker" not in " ".join(p.cmdline())  # multiprocessing's, one per process for good
        except psutil.Error:
            return False

    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and ours(p)]
    gone, alive = psutil.wait_procs(new, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]  # the cluster started for the batch was closed


def test_opening_an_image_reads_only_its_header(tmp_path):
    # planning a batch opens every file: no pixels, no dask.array (which imports xarray and pandas), no zarr
    import subprocess
    import sys

    img = np.arange(30 * 40 * 3, dtype=np.uint16).reshape(3, 30, 40)
    tifffile.imwrite(tmp_path / "raw.tif", img, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "zip.tif", img[0], compression="zlib")
    code = ("import sys; from cellsynth.batch.sources import open_image\n"
            f"a, b = open_image({str(tmp_path / 'raw.tif')!r}), open_image({str(tmp_path / 'zip.tif')!r})\n"
            "print(a.shape, a.stack_shape, a.stack_axes, a.n_planes, a.fingerprint()['shape'], b.shape, b.stack_shape,"
            " 'dask.array' in sys.modules, 'zarr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == "(3, 30, 40) (3,) T 3 [3, 30, 40] (30, 40) () False False".split(), out
    a = open_image(tmp_path / "raw.tif")
    np.testing.assert_array_equal(a.plane((2,))[0].compute(scheduler="synchronous"), img[2])
    np.testing.assert_array_equal(open_image(tmp_path / "zip.tif").data.compute(scheduler="synchronous"), img[0])


def test_interrupted_run_keeps_finished_planes(client, images, tmp_path):
    out = tmp_path / "out"

    def stop(p):
        if p.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        count_batch([images], out, params=CLASSIC, scheduler=client, progress=stop)
    assert len(list((out / ".records").glob("*.json"))) == 5
    assert not list(out.rglob("*.part"))
    res = count_batch([images], out, params=CLASSIC, scheduler=client)
    assert (res.counted, res.skipped) == (8, 5)
    assert {(r["image"], int(r["plane"])): int(r["count"]) for r in _table(out)} == _expected(images)


def test_never_overwrites_without_overwrite(client, images, tmp_path):
    out = tmp_path / "out"
    count_batch([images / "plate"], out, params=CLASSIC, scheduler=client)
    before = (out / "counts.csv").read_bytes()
    with pytest.raises(FileExistsError, match="diameter"):
        count_batch([images / "plate"], out, params=BatchParams(model="classic", diameter=20.0), scheduler=client)
    changed = images / "plate" / "A03.tif"
    tifffile.imwrite(changed, _field(77))
    with pytest.raises(FileExistsError, match="changed since it was counted"):
        count_batch([images / "plate"], out, params=CLASSIC, scheduler=client)
    assert (out / "counts.csv").read_bytes() == before
    res = count_batch([images / "plate"], out, params=CLASSIC, scheduler=client, overwrite=True)
    assert res.counted == 9
    row = [r for r in _table(out) if r["image"] == str(changed.resolve())][0]
    assert int(row["count"]) == count_cells(_field(77), model="classic", diameter=12.0).count
    (images / "plate" / "broken.tif").write_bytes(b"not a tiff")
    res = count_batch([images / "plate"], out, params=CLASSIC, scheduler=client)
    assert (res.counted, res.skipped) == (0, 9) and len(res.errors) == 1 and "broken.tif" in res.errors[0]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no count-batch results"):
        count_batch([images / "plate"], foreign, params=CLASSIC, scheduler=client)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_cli_count_batch_on_a_scheduler_address(client, images, tmp_path, capsys):
    out = tmp_path / "res"
    args = ["count-batch", str(images / "plate" / "A0[0-3].tif"), str(images / "movie.tif"), "--out", str(out),
            "--model", "classic", "--diameter", "12", "--scheduler", client.scheduler.address, "--quiet", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["counted"], doc["skipped"]) == (8, 0)
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["counted"] == 0
    assert main(args[:-6] + ["--diameter", "15", "--scheduler", client.scheduler.address, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert main(["count-batch", str(tmp_path / "nothing*.tif"), "--out", str(out)]) == 2
    assert "no image matches" in capsys.readouterr().err
    assert main(["count-batch", str(images), "--out", str(tmp_path / "r2"), "--scheduler", "tcp://x:1",
                 "--workers", "2"]) == 2


def test_workers_count_from_the_clients_onnx_export_without_torch(client, images, tmp_path, monkeypatch):
    import sys

    torch = pytest.importorskip("torch")
    from cellsynth.count import engines, counter_config, save_counter
    from cellsynth.count._nets import build_net

    if not engines.available():
        pytest.skip("onnxruntime is not installed")
    monkeypatch.setenv("CELLSYNTH_ONNX_CACHE", "")  # the export lives in this process only: workers get it sent
    monkeypatch.setattr(engines, "_MEMORY", {})  # and is forgotten after this test
    monkeypatch.delenv("CELLSYNTH_ENGINE", raising=False)
    torch.manual_seed(0)
    cfg = counter_config("density", backbone="test_efficientnet", blocks=3)
    model = save_counter(build_net(cfg), cfg, tmp_path / "tiny")
    params = BatchParams(model=str(model), diameter=12.0, tile=128)
    plate = sorted((images / "plate").glob("A0[0-3].tif"))
    res = count_batch(plate, tmp_path / "out", params=params, scheduler=client)
    assert res.errors == [] and res.counted == 4
    counter = load_counter(model, device="cpu")
    for row in res.rows:
        ref = count_cells(tifffile.imread(row["image"]), counter=counter, diameter=12.0, tile=128)
        assert int(row["count"]) == ref.count and ref.meta["engine"] == "onnxruntime"
    # the workers that counted did so with the client's export (in their memory); none imported torch or timm
    key = engines.export_bytes(counter)[0]
    records = (tmp_path / "out" / ".records").glob("*.json")
    pids = {int(json.loads(p.read_text())["worker"].rsplit(":", 1)[1]) for p in records}
    held = client.run(lambda k=key: (os.getpid(), k in __import__("cellsynth.count.engines").count.engines._MEMORY))
    assert pids and pids <= {pid for pid, has in held.values() if has}, (pids, held)
    assert not any(client.run(lambda: "torch" in sys.modules or "timm" in sys.modules).values())


def test_sources_read_ome_zarr_png_and_refuse_bad_input(tmp_path):
    import zarr
    from skimage.io import imsave

    stack = np.stack([_field(k) for k in range(3)])
    root = zarr.open_group(str(tmp_path / "cells.ome.zarr"), mode="w")
    root.create_array("0", data=stack, chunks=(1, 48, 56))
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "z", "type": "space"}, {"name": "y"},
                                                             {"name": "x"}], "datasets": [{"path": "0"}]}]
    rgb = np.zeros((40, 50, 3), np.uint8)
    imsave(tmp_path / "rgb.png", rgb, check_contrast=False)
    (tmp_path / "notes.txt").write_text("x")
    found = find_images([tmp_path])
    assert [p.name for p in found] == ["cells.ome.zarr", "rgb.png"]
    z = open_image(found[0])
    assert (z.stack_shape, z.stack_axes) == ((3,), "Z")
    plane, ch = z.plane((2,))
    assert ch is None and np.array_equal(np.asarray(plane), stack[2])
    png = open_image(found[1])
    assert png.stack_shape == () and png.plane(())[1] == 2
    with pytest.raises(ValueError, match="unsupported image type"):
        find_images([tmp_path / "notes.txt"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_images([tmp_path / "missing.tif"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        find_images([tmp_path / "empty"])


# ----------------------------------------------------------------------------- lazy path

def test_small_planes_are_read_as_open_image_reads_them_without_dask_array(tmp_path):
    import subprocess
    import sys

    from cellsynth.batch.sources import read_small_plane

    rng = np.random.default_rng(0)
    img = rng.integers(0, 60000, (40, 50)).astype(np.uint16)
    cases = {"plain.tif": dict(data=img), "big_endian.tif": dict(data=img, byteorder=">"),
             "compressed.tif": dict(data=img, compression="zlib"),
             "cyx.tif": dict(data=np.stack([img, img // 2]), imagej=True, metadata={"axes": "CYX"}),
             "rgb.tif": dict(data=rng.integers(0, 255, (40, 50, 3)).astype(np.uint8), photometric="rgb")}
    for name, kw in cases.items():
        tifffile.imwrite(tmp_path / name, **kw)
        fast, ch = read_small_plane(tmp_path / name, 10_000)
        lazy, lazy_ch = open_image(tmp_path / name).plane(())
        assert ch == lazy_ch and fast.dtype == lazy.dtype and fast.dtype.isnative, name
        np.testing.assert_array_equal(fast, lazy.compute(scheduler="synchronous"), err_msg=name)
    tifffile.imwrite(tmp_path / "movie.tif", np.stack([img, img]), imagej=True, metadata={"axes": "TYX"})
    assert read_small_plane(tmp_path / "movie.tif", 10_000) is None  # stacks: open_image
    assert read_small_plane(tmp_path / "plain.tif", 1_999) is None  # large: counted in chunks
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    assert read_small_plane(tmp_path / "bad.tif", 10_000) is None  # open_image says what is wrong
    # a worker counting a small image imports neither dask.array nor zarr (1.4 s per worker)
    code = ("import sys; from cellsynth.batch.engine import count_plane, BatchParams; "
            f"r = count_plane({str(tmp_path / 'plain.tif')!r}, (), BatchParams(model='classic', diameter=8)); "
            "print(r['count'], 'dask.array' in sys.modules, 'zarr' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1:] == ["False", "False"]
    expected = count_cells(img, model="classic", diameter=8).count
    assert int(out[0]) == expected


def test_chunk_plan_cores_partition_the_axis_and_reads_hold_the_halo():
    for length in (50, 700, 1999, 5000):
        p = chunk_plan(length, core=448, halo=120)
        assert p.cores[0][0] == 0 and p.cores[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(p.cores, p.cores[1:]))
        for (r0, r1), (c0, c1) in zip(p.reads, p.cores):
            assert r0 == max(0, c0 - 120) and r1 == min(length, c1 + 120)
    assert len(chunk_plan(5000, core=448, halo=120).cores) == 11


def test_image_statistics_equal_the_in_memory_ones():
    """Percentiles and foreground threshold from dask chunks equal those count_cells computes on the whole plane."""
    import dask.array as da
    from scipy.ndimage import gaussian_filter

    from cellsynth.count.classic import foreground_threshold
    from cellsynth.count.preprocess import normalize_image

    img = np.concatenate([_field(s, shape=(400, 1150), n=60) for s in range(3)])  # 1.38 MP: strided samples
    counter = load_counter("default", device="cpu")
    stats = image_statistics(da.from_array(img, chunks=(256, 300)), counter, diameter=12.0)
    step = max(1, int(np.sqrt(img.size / 1e6)))
    assert step == 1 or img[::step, ::step].size < img.size
    lo, hi = counter.config["normalize"]["low"], counter.config["normalize"]["high"]
    expected = np.percentile(img.astype(np.float32)[::step, ::step], [lo, hi, 99.99])
    assert np.allclose(stats["percentiles"], expected, rtol=0, atol=1e-6)
    plane = normalize_image(img, low=lo, high=hi)
    sigma = max(0.5, counter.config["objects"]["outline_sigma"] * 12.0)
    thr = foreground_threshold(plane, gaussian_filter(plane, sigma), sigma=sigma)
    assert stats["factor"] == pytest.approx(counter.diameter / 12.0)
    assert stats["foreground"] == pytest.approx(thr, abs=1e-6)


def _nuclei(shape, seed):
    from cellsynth.count.synth import SynthParams, synthetic_nuclei

    img, _, _ = synthetic_nuclei(SynthParams(shape=shape, diameter=(14.0, 16.0), coverage=(0.25, 0.35)), rng=seed)
    return (np.clip(img, 0, 4) / 4 * 60000).astype(np.uint16)


def test_lazy_count_gives_the_same_points_as_in_memory():
    """At the counter's own scale the chunked count is the in-memory count: same points, same scores."""
    counter = load_counter("default", device="cpu")
    img = _nuclei((360, 420), 3)
    kw = dict(counter=counter, diameter=counter.diameter, tile=64, overlap=8)
    ref = count_cells(img, **kw)
    seen = []
    lazy = count_large(img, core=112, progress=seen.append, **kw)
    assert lazy.meta["chunks"] >= 4 and seen[-1].step == seen[-1].total == lazy.meta["chunks"]
    order = np.lexsort((ref.points[:, 1], ref.points[:, 0]))
    assert lazy.count == ref.count > 100
    assert np.allclose(lazy.points, ref.points[order], atol=1e-3)
    assert np.allclose(lazy.scores, ref.scores[order], atol=1e-3)
    # rescaled (diameter estimated): the chunks' pixel grids differ by a fraction of a pixel
    ref2 = count_cells(img, counter=counter, tile=64, overlap=8)
    lazy2 = count_large(img, counter=counter, tile=64, overlap=8, core=112)
    assert lazy2.meta["diameter_used"] == ref2.meta["diameter_used"]
    assert abs(lazy2.count - ref2.count) <= 0.03 * ref2.count
    from scipy.spatial import cKDTree

    d, _ = cKDTree(ref2.points).query(lazy2.points)
    assert np.mean(d < 1.5) > 0.95


def test_large_plane_in_a_batch_goes_through_chunks(client, tmp_path):
    img = np.concatenate([_field(s, shape=(150, 300), n=25) for s in range(2)])
    tifffile.imwrite(tmp_path / "big.tif", img, tile=(64, 64))
    params = BatchParams(model="classic", diameter=12.0, large_pixels=150 * 150)
    res = count_batch([tmp_path / "big.tif"], tmp_path / "out", params=params, scheduler=client)
    row = res.rows[0]
    assert row["lazy"] is True
    assert row["count"] == count_large(img, model="classic", diameter=12.0).count
    assert abs(row["count"] - count_cells(img, model="classic", diameter=12.0).count) <= 1


def test_lazy_refuses_stacks_and_regression_counters():
    with pytest.raises(ValueError, match="one 2D plane"):
        count_large(np.zeros((6, 40, 50), np.uint16), model="classic", diameter=10.0)
    with pytest.raises(ValueError, match="tile must be"):
        count_large(np.zeros((40, 50)), model="classic", tile=100)


def test_uncompressed_tiff_is_read_in_bands_not_as_one_chunk(tmp_path):
    from cellsynth.batch.sources import _bands

    img = (np.random.default_rng(1).random((300, 220)) * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "big_endian.tif", img, byteorder=">")
    lazy = open_image(tmp_path / "big_endian.tif")
    assert lazy.data.dtype == np.uint16 and np.array_equal(np.asarray(lazy.data[40:260, 10:200]), img[40:260, 10:200])
    with tifffile.TiffFile(tmp_path / "big_endian.tif") as tif:
        offset, dtype = tif.series[0].dataoffset, np.dtype(">u2")
    bands = _bands(tmp_path / "big_endian.tif", offset, img.shape, dtype, band_bytes=220 * 2 * 64)
    assert bands.chunks[0] == (64, 64, 64, 64, 44)
    assert np.array_equal(np.asarray(bands[100:200]), img[100:200])


def _same_dataset(a: Path, b: Path) -> dict:
    """Two dataset folders hold the same manifest and the same files (TIFF pixels, CSV text)."""
    from cellsynth import io

    ma, mb = json.loads((a / "manifest.json").read_text()), json.loads((b / "manifest.json").read_text())
    assert ma == mb
    for item in ma["items"]:
        for key in ("image", "labels", "centres"):
            if item.get(key) is None:
                continue
            if item[key].endswith(".tif"):
                assert np.array_equal(io.read_tiff(a / item[key])[0], io.read_tiff(b / item[key])[0])
            else:
                assert (a / item[key]).read_text() == (b / item[key]).read_text()
    return ma


_LAYOUTS = ["layouts", "--size", "32", "32", "--count-mean", "5", "--count-std", "0", "--count-min", "2",
            "--count-max", "8", "--cell-size", "8", "--seed", "3"]


def test_layouts_on_the_cluster_equal_the_serial_command_and_resume(client, tmp_path, capsys):
    addr = client.scheduler.address
    lay = _LAYOUTS
    assert main(lay + ["--n", "5", "--out", str(tmp_path / "serial")]) == 0
    # an export stopped after 3 layouts, resumed to 5 on the cluster: the 3 are kept, the whole equals the serial one
    assert main(lay + ["--n", "3", "--out", str(tmp_path / "dask"), "--scheduler", addr]) == 0
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "dask").rglob("layout_*")}
    assert len(kept) == 9
    assert main(lay + ["--n", "5", "--out", str(tmp_path / "dask"), "--scheduler", addr]) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    doc = _same_dataset(tmp_path / "serial", tmp_path / "dask")
    assert len(doc["items"]) == 5 and doc["complete"]
    before = (tmp_path / "dask" / "manifest.json").read_bytes()
    capsys.readouterr()
    assert main(lay[:-1] + ["4", "--n", "5", "--out", str(tmp_path / "dask"), "--scheduler", addr]) == 2
    assert "other parameters or seed" in capsys.readouterr().err
    assert (tmp_path / "dask" / "manifest.json").read_bytes() == before
    assert main(lay + ["--n", "2", "--out", str(tmp_path / "x"), "--scheduler", addr, "--workers", "2"]) == 2


def test_stylization_on_the_cluster_equals_the_serial_command(client, tmp_path, one_torch_thread):
    """Last in this file: its workers import torch and diffusers."""
    pytest.importorskip("diffusers")
    from cellsynth import io
    from cellsynth.stylize import save_token
    from cellsynth.stylize.tiny import save_tiny_pipeline, tiny_token

    addr = client.scheduler.address
    assert main(_LAYOUTS + ["--n", "2", "--out", str(tmp_path / "lay")]) == 0
    model = save_tiny_pipeline(tmp_path / "tiny-sd", seed=0)
    token = save_token(tiny_token(0), tmp_path / "token")
    io.write_tiff(tmp_path / "style.tif", (np.random.default_rng(0).random((32, 32)) * 255).astype(np.uint8))
    sty = ["stylize-dataset", str(tmp_path / "lay"), "--style", str(tmp_path / "style.tif"), "--token", str(token),
           "--model", str(model), "--steps", "2", "--size", "32", "--device", "cpu", "--qc-model", "classic",
           "--tolerance", "5"]
    assert main(sty + ["--out", str(tmp_path / "syn")]) == 0
    # the workers load the pipeline once each and stylize; this process writes: the same manifest and images
    assert main(sty + ["--out", str(tmp_path / "syn_dask"), "--dask-scheduler", addr]) == 0
    doc = _same_dataset(tmp_path / "syn", tmp_path / "syn_dask")
    assert len(doc["items"]) == 2 and doc["stylize"]["model"]
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "syn_dask" / "images").iterdir()}
    assert main(sty + ["--out", str(tmp_path / "syn_dask"), "--dask-scheduler", addr]) == 0  # done: nothing redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_count_batch_counts_cells_per_region_of_every_plane(client, tmp_path):
    """Regions shared by every image (e.g. well quadrants): counts.csv gets each plane's cells per region."""
    import csv

    folder = tmp_path / "plate"
    folder.mkdir()
    truth = {"w1": ([(20, 20), (20, 60), (70, 30)], [(30, 140)]), "w2": ([(40, 40)], [(20, 130), (70, 160), (50, 180)])}
    for name, (left, right) in truth.items():
        img = np.full((100, 200), 300, np.uint16)
        for c in left + right:
            img[disk(c, 6, shape=img.shape)] = 1500
        tifffile.imwrite(folder / f"{name}.tif", img)
    (tmp_path / "halves.csv").write_text(
        "index,shape-type,vertex-index,axis-0,axis-1\n"
        "0,rectangle,0,0,0\n0,rectangle,1,0,99\n0,rectangle,2,99,99\n0,rectangle,3,99,0\n"
        "1,rectangle,0,0,100\n1,rectangle,1,0,199\n1,rectangle,2,99,199\n1,rectangle,3,99,100\n")
    params = BatchParams(model="classic", diameter=12.0, regions=str(tmp_path / "halves.csv"))
    res = count_batch([folder], tmp_path / "out", params=params, scheduler=client)
    got = {Path(r["image"]).stem: (r["in region 1"], r["in region 2"]) for r in res.rows}
    assert got == {k: (len(a), len(b)) for k, (a, b) in truth.items()}
    with open(res.table, newline="") as fh:
        header = next(csv.reader(fh))
    assert header[-2:] == ["in region 1", "in region 2"]
    # the regions are a view of the points: a re-run without them counts nothing again and drops the columns
    again = count_batch([folder], tmp_path / "out", params=BatchParams(model="classic", diameter=12.0),
                        scheduler=client)
    assert again.counted == 0 and again.skipped == 2 and not any(k.startswith("in ") for k in again.rows[0])
    with pytest.raises(FileNotFoundError):
        count_batch([folder], tmp_path / "out2", params=BatchParams(model="classic", regions=str(tmp_path / "no.csv")),
                    scheduler=client)


def _marker_image(path: Path, seed: int, positive: int, n: int = 16) -> None:
    """Nuclei in channel 0, a marker in the first ``positive`` of ``n`` of them (channel 1)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 20, (2, 128, 128)).astype(np.uint16)
    centres: list = []
    while len(centres) < n:
        c = rng.uniform(10, 118, 2)
        if all(np.hypot(*(c - d)) > 22 for d in centres):
            centres.append(c)
    for k, c in enumerate(centres):
        rr, cc = disk(tuple(c), 6, shape=img.shape[1:])
        img[0, rr, cc] += 800
        img[1, rr, cc] += 500 + 30 * k if k < positive else 25
    tifffile.imwrite(path, img, imagej=True, metadata={"axes": "CYX"})


def test_count_batch_classes_marker_positive_nuclei_as_the_count_command(client, tmp_path, capsys):
    folder = tmp_path / "wells"
    folder.mkdir()
    truth = {"a": 5, "b": 11}
    for k, (name, pos) in enumerate(truth.items()):
        _marker_image(folder / f"{name}.tif", k, pos)
    params = BatchParams(model="classic", diameter=12.0, channel=0, measure_channels="1", marker_names="Ki67")
    res = count_batch([folder], tmp_path / "out", params=params, scheduler=client)
    rows = {Path(r["image"]).stem: r for r in res.rows}
    for name, pos in truth.items():
        assert (rows[name]["count"], rows[name]["Ki67+"], rows[name]["negative"]) == (16, pos, 16 - pos)
        # the same classes, thresholds and points as `cellsynth count` on the same image
        assert main(["count", str(folder / f"{name}.tif"), "--model", "classic", "--diameter", "12", "--channel", "0",
                     "--measure-channels", "1", "--marker-names", "Ki67", "--json", "--quiet"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert {c["class"]: c["count"] for c in doc["markers"]["classes"]} == {"negative": 16 - pos, "Ki67+": pos}
        assert doc["markers"]["thresholds"] == [rows[name]["threshold Ki67"]]
        with open(tmp_path / "out" / rows[name]["points_csv"], newline="") as fh:
            classes = [p["class"] for p in csv.DictReader(fh)]
        assert classes.count("Ki67+") == pos
    with open(res.table, newline="") as fh:
        header = next(csv.reader(fh))
    assert {"negative", "Ki67+", "Ki67+ %", "threshold Ki67"} <= set(header)
    rec = json.loads((tmp_path / "out" / "counts.provenance.json").read_text())
    assert sorted(f["name"] for f in rec["inputs"]) == ["a.tif", "b.tif"] and all(len(f["sha256"]) == 64
                                                                                 for f in rec["inputs"])
    assert rec["parameters"]["measure_channels"] == [1] and rec["model"]["model"] == "classic"
    # thresholds are applied to the records: a typed one counts nothing again and re-classes the points files
    again = count_batch([folder], tmp_path / "out", params=BatchParams(
        model="classic", diameter=12.0, channel=0, measure_channels=(1,), thresholds=(5000.0,)), scheduler=client)
    assert again.counted == 0 and all(r["ch1+"] == 0 and r["negative"] == 16 for r in again.rows)
    with open(tmp_path / "out" / "points" / "a.csv", newline="") as fh:
        assert {p["class"] for p in csv.DictReader(fh)} == {"negative"}
    # a channel the images do not have: an error per image, nothing recorded for it
    bad = count_batch([folder], tmp_path / "out3", params=BatchParams(model="classic", diameter=12.0, channel=0,
                                                                      measure_channels=(4,)), scheduler=client)
    assert bad.counted == 0 and len(bad.errors) == 2 and "channels 0..1" in bad.errors[0]
    with pytest.raises(ValueError, match="one finite number per measured channel"):
        BatchParams(measure_channels=(1, 2), thresholds=(3.0,))


def test_plane_means_in_bands_equal_the_whole_plane():
    """Large planes are measured in bands of rows: the same means as on the whole plane, neighbours included."""
    import dask.array as da

    from cellsynth.batch.engine import plane_means
    from cellsynth.count.markers import nucleus_means

    rng = np.random.default_rng(5)
    img = rng.integers(0, 1000, (100, 90, 3)).astype(np.uint16)  # channels last, as RGB-like files read
    pts = rng.uniform(0, 100, (60, 2)) * [1.0, 0.9]
    whole = nucleus_means(np.moveaxis(img, -1, 0)[[2, 0]], pts, diameter=9.0)
    banded = plane_means(da.from_array(img, chunks=(25, 30, 3)), 2, (2, 0), pts, 9.0, band=16)
    np.testing.assert_allclose(banded, whole)
    with pytest.raises(ValueError, match="one channel"):
        plane_means(img[..., 0], None, (1,), pts, 9.0)
