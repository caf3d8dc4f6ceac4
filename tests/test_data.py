"""Shards: official layouts -> prepare -> partition -> read back; bad inputs."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config
from layouts import CELEBA_NAMES, make_celeba, make_cub, make_folder, make_mnist
from PIL import Image

from collafuse_hpc.config import from_dict
from collafuse_hpc.data import (
    EpochSampler,
    ShardReader,
    Split,
    inspect_shard,
    random_hflip,
    to_model_range,
    write_shard,
)
from collafuse_hpc.data import prepare as prep
from collafuse_hpc.data.prepare import prepare
from collafuse_hpc.data.sources import read_celeba, read_cub, read_folder, read_mnist
from collafuse_hpc.runtime.run import preflight


def _read(path, split="train"):
    with h5py.File(path) as f:
        g = f[split]
        return {k: g[k][()] for k in g}, dict(f.attrs)


def test_prepared_digit_shards_are_non_iid_and_valid(shards):
    seen = []
    for path in shards:
        info = inspect_shard(path, verify_hash=True)
        assert (info.channels, info.image_size) == (1, 8) and info.has_labels
        data, attrs = _read(path)
        assert attrs["dataset"] == "sklearn-digits" and attrs["partition"].startswith("class seed=0")
        seen.append(set(np.unique(data["labels"])))
        with h5py.File(path) as f:
            assert f["train/images"].chunks == (1, 1, 8, 8) and f["train/images"].compression is None
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])  # disjoint digits
    assert set().union(*seen) == set(range(10))


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("celeba"))
    return root, make_celeba(root)


def test_celeba_attribute_groups_overlap_and_exclusive(celeba, tmp_path):
    root, attrs = celeba
    groups = [["Eyeglasses"], ["Male", "Wearing_Hat"]]
    catalog = read_celeba(root)
    assert catalog.attribute_names == CELEBA_NAMES and np.array_equal(catalog.attributes, attrs)
    over = prepare(catalog, str(tmp_path / "o"), 2, "attributes", groups=groups, size=16, crop=140, workers=2)
    excl = prepare(catalog, str(tmp_path / "e"), 2, "attributes", groups=groups, exclusive=True, size=16, workers=2)
    ids = {}
    for mode, paths in (("overlap", over), ("exclusive", excl)):
        ids[mode] = []
        for k, path in enumerate(paths):
            train, attrs_ = _read(path, "train")
            test, _ = _read(path, "test")
            assert train["images"].shape[1:] == (3, 16, 16) and train["attributes"].dtype == np.int8
            assert [str(n) for n in attrs_["attribute_names"]] == CELEBA_NAMES
            assert "centre crop 140" in attrs_["recipe"] or mode == "exclusive"
            cols = [CELEBA_NAMES.index(a) for a in groups[k]]
            for split in (train, test):
                assert split["attributes"][:, cols].any(axis=1).all()  # every image qualifies
            assert all(int(i.decode()[:6]) > 12 for i in test["ids"])  # official test partition (2)
            ids[mode].append({i.decode() for s in (train, test) for i in s["ids"]})
    assert "000001.jpg" in ids["overlap"][0] and "000001.jpg" in ids["overlap"][1]
    assert not (ids["exclusive"][0] & ids["exclusive"][1])
    assert ids["exclusive"][0] | ids["exclusive"][1] == ids["overlap"][0] | ids["overlap"][1]


def test_same_seed_same_split_and_resumed_decoding(celeba, tmp_path, caplog):
    root, _ = celeba
    caplog.set_level("INFO", logger="collafuse_hpc")
    a = prepare(read_celeba(root), str(tmp_path / "a"), 2, "iid", size=8, seed=3, workers=2)
    first = [inspect_shard(p).content_hash for p in a]
    assert re.search(r"decoding celeba: \d+/\d+ images, [\d.]+ images/s, done, 0 unreadable", caplog.text)
    caplog.clear()
    again = prepare(read_celeba(root), str(tmp_path / "a"), 2, "iid", size=8, seed=3, workers=2)
    assert [inspect_shard(p).content_hash for p in again] == first
    assert "decoding celeba: 0/0 images, nothing to do" in caplog.text  # everything came from the cache
    other = prepare(read_celeba(root), str(tmp_path / "b"), 2, "iid", size=8, seed=4, workers=2)
    assert [inspect_shard(p).content_hash for p in other] != first


def test_a_shard_says_how_its_pixels_were_made_and_another_preparation_never_replaces_it(celeba, tmp_path):
    root, _ = celeba
    (path,) = prepare(read_celeba(root), str(tmp_path / "a"), 1, "iid", size=8, crop=500, workers=2)
    assert inspect_shard(path) and _read(path)[1]["recipe"].startswith(
        "centre crop 178 (asked 500, limited by the image size), bicubic resize to 8x8"
    )
    (path,) = prepare(read_celeba(root), str(tmp_path / "b"), 1, "iid", size=8, crop=140, workers=2)
    assert _read(path)[1]["recipe"].startswith("centre crop 140, bicubic")
    # runs trained on a folder's shards check their content: another preparation there (fewer clients,
    # another seed) would leave them unable to resume or be evaluated, so it is refused; the same one is not
    make_folder(str(tmp_path / "folder"))
    prepare(read_folder(str(tmp_path / "folder")), str(tmp_path / "c"), 3, "iid", size=8, workers=2)
    shards = {p: p.read_bytes() for p in (tmp_path / "c").glob("client_*.h5")}
    for clients, seed in ((2, 0), (3, 1)):
        with pytest.raises(ValueError, match=r"client_0.h5', .* exist: shards of another preparation; runs trained"):
            prepare(read_folder(str(tmp_path / "folder")), str(tmp_path / "c"), clients, "iid", size=8, seed=seed)
    assert {p: p.read_bytes() for p in (tmp_path / "c").glob("client_*.h5")} == shards
    prepare(read_folder(str(tmp_path / "folder")), str(tmp_path / "c"), 3, "iid", size=8, workers=2)


def test_prepare_refuses_another_preparations_shards_before_decoding(tmp_path, monkeypatch):
    """Other images, told from the source's file list, are refused before anything is
    decoded (a refused CelebA preparation decoded for hours into --out/.cache first)."""
    make_folder(str(tmp_path / "folder"))
    catalog = read_folder(str(tmp_path / "folder"))
    prepare(catalog, str(tmp_path / "c"), 3, "iid", size=8, workers=1)

    def decode(*args, **kwargs):
        raise AssertionError("decoded before refusing")

    monkeypatch.setattr(prep, "decode", decode)
    for clients, seed, size in ((2, 0, 8), (3, 1, 8), (3, 0, 16)):  # fewer clients, other images, another size
        with pytest.raises(ValueError, match=r"exist: shards of another preparation"):
            prepare(catalog, str(tmp_path / "c"), clients, "iid", size=size, seed=seed, workers=1)


@pytest.mark.slow
def test_ctrl_c_during_prepare_says_what_was_kept_and_exits_130(tmp_path):
    root = tmp_path / "folder"
    make_folder(str(root), classes=2, per_class=40)
    # an "image" that is a named pipe: its decoding waits until someone writes to it, so the
    # signal lands mid-way however busy the machine is (a fixed amount of work raced it)
    os.mkfifo(root / "class_1" / "img_5.jpg.fifo.jpg")
    cmd = [sys.executable, "-m", "collafuse_hpc", "prepare", "folder", "--root", str(root), "--workers", "1"]
    proc = subprocess.Popen([*cmd, "--out", str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    seen = ""
    while "decoding folder" not in seen:  # the progress line: decoding has begun
        chunk = proc.stderr.read(1)
        assert chunk, f"prepare ended before decoding: {seen}"
        seen += chunk
    proc.send_signal(signal.SIGINT)
    try:
        err = seen + proc.communicate(timeout=60)[1]
    finally:
        proc.kill()  # a prepare that ignored the signal would wait on the pipe for ever
    assert proc.returncode == 130, err
    # the first batch of decoded images was not complete: none is kept, and none is claimed
    assert "interrupted; run the same command again to continue" in err and not (tmp_path / "out/.cache").exists()
    assert "Traceback" not in err and not list((tmp_path / "out").glob("client_*.h5"))


def test_unreadable_images_are_skipped_and_reported_or_fail_in_strict_mode(tmp_path, capsys, caplog):
    root = str(tmp_path / "celeba")
    make_celeba(root)
    os.remove(os.path.join(root, "img_align_celeba", "000002.jpg"))  # listed but missing
    with open(os.path.join(root, "img_align_celeba", "000003.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ValueError, match=r"2 unreadable image\(s\) \(strict mode\).*kept in"):
        prepare(read_celeba(root), str(tmp_path / "out"), 1, "iid", size=8, workers=2, strict=True)
    caplog.set_level("INFO", logger="collafuse_hpc")
    caplog.clear()
    (path,) = prepare(read_celeba(root), str(tmp_path / "out"), 1, "iid", size=8, workers=2)
    err = capsys.readouterr().err
    assert "2 unreadable image(s) left out" in err and "000003.jpg" in err
    ids = {i.decode() for s in ("train", "test") for i in _read(path, s)[0]["ids"]}
    assert len(ids) == 14 and not {"000002.jpg", "000003.jpg"} & ids
    # the strict run's cache is reused; only the failures are tried again
    assert "decoding celeba: 2/2 images" in caplog.text and "2 unreadable" in caplog.text
    caplog.clear()
    # a repaired image is decoded on the next run, and a changed one is decoded again
    shutil.copy(
        os.path.join(root, "img_align_celeba", "000004.jpg"), os.path.join(root, "img_align_celeba", "000003.jpg")
    )
    Image.new("RGB", (178, 218), (255, 0, 0)).save(os.path.join(root, "img_align_celeba", "000005.jpg"))
    os.remove(path)  # other pixels: the old shard is refused as another preparation's until it is removed
    (path,) = prepare(read_celeba(root), str(tmp_path / "out"), 1, "iid", size=8, workers=2)
    assert "decoding celeba: 3/3 images" in caplog.text  # 000002 (still missing), 000003, 000005
    (train, _), (test, _) = _read(path, "train"), _read(path, "test")
    pixels = {i.decode(): img for s in (train, test) for i, img in zip(s["ids"], s["images"])}
    assert "000003.jpg" in pixels and (pixels["000005.jpg"][0] > 200).all()  # red, not the old pixels


def test_missing_metadata_file_is_named(tmp_path):
    root = str(tmp_path / "celeba")
    make_celeba(root)
    os.remove(os.path.join(root, "list_eval_partition.txt"))
    with pytest.raises(ValueError, match="CelebA partition file: .*list_eval_partition.txt' not found"):
        read_celeba(root)


def test_cub_labels_boxes_and_repaired_attribute_lines(tmp_path, capsys):
    root = make_cub(str(tmp_path))
    catalog = read_cub(root)
    assert catalog.notes and "repaired 2 malformed line(s)" in catalog.notes[0]
    expected = np.array([[(i + a) % 3 == 0 for a in range(1, 5)] for i in range(12)], dtype=np.int8)
    assert np.array_equal(catalog.attributes, expected)  # malformed lines read too
    paths = prepare(catalog, str(tmp_path / "out"), 3, "class", size=16, bbox_margin=0.1, workers=2)
    assert "repaired 2 malformed" in capsys.readouterr().out
    for k, path in enumerate(paths):
        train, attrs = _read(path)
        assert set(train["labels"]) == {k} and "bounding box" in attrs["recipe"]
        assert all(i.decode().startswith(f"{k + 1:03d}.") for i in train["ids"])


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_gzipped_or_plain(tmp_path, gz):
    make_mnist(str(tmp_path), gz)
    catalog = read_mnist(str(tmp_path))
    assert len(catalog) == 30 and catalog.channels == 1
    (path,) = prepare(catalog, str(tmp_path / "out"), 1, "iid", size=32)
    assert inspect_shard(path).counts == {"train": 20, "test": 10}  # official split kept


def test_wrong_idx_magic_is_named(tmp_path):
    make_mnist(str(tmp_path), gz=False)
    with open(tmp_path / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.write(b"\x00\x00\x09\x99")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte' is not an IDX file with magic 2049"):
        read_mnist(str(tmp_path))


def test_folder_with_dirichlet_label_skew(tmp_path):
    make_folder(str(tmp_path / "imgs"), classes=3, per_class=10)
    catalog = read_folder(str(tmp_path / "imgs"))
    assert sorted(set(catalog.labels)) == [0, 1, 2]
    paths = prepare(catalog, str(tmp_path / "out"), 3, "dirichlet", alpha=0.1, size=8, test_fraction=0.1, seed=1)
    hists = [np.bincount(_read(p)[0]["labels"], minlength=3) for p in paths]
    assert sum(h.sum() for h in hists) + sum(inspect_shard(p).counts["test"] for p in paths) == 30
    assert max(h.max() / h.sum() for h in hists) > 0.6  # skewed, not iid


def test_shards_of_different_resolutions_fail_before_any_run(tmp_path, shards):
    other = str(tmp_path / "big.h5")
    images = np.zeros((4, 1, 16, 16), np.uint8)
    write_shard(other, {"train": Split(images), "test": Split(images)})
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.2])
    raw["clients"][1]["shard"] = other
    with pytest.raises(ValueError, match="big.h5.*holds 1x16x16 images, but 'data' asks for 1x8x8"):
        preflight(from_dict(raw), resume=False)


def test_reader_returns_requested_order_with_repeats(shards):
    reader = ShardReader(shards[0])
    images, labels = reader.read(np.array([5, 2, 5, 0]))
    with h5py.File(shards[0]) as f:
        assert np.array_equal(images, f["train/images"][()][[5, 2, 5, 0]])
        assert np.array_equal(labels, f["train/labels"][()][[5, 2, 5, 0]])
    x = to_model_range(images, "cpu")
    assert x.min() >= -1 and x.max() <= 1


def test_sampler_covers_each_epoch_and_resumes_identically():
    a = EpochSampler(10, 4, seed=3)
    first = np.concatenate([a.next() for _ in range(5)])  # 20 = two epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    b = EpochSampler(10, 4, seed=3)
    b.next()
    c = EpochSampler(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert np.array_equal(np.concatenate([c.next() for _ in range(4)]), first[4:])


def test_bad_shards_are_named(tmp_path):
    bogus = tmp_path / "bogus.h5"
    with h5py.File(bogus, "w") as f:
        f.attrs["schema"] = "something-else"
    with pytest.raises(ValueError, match="bogus.h5.*schema 'something-else'"):
        inspect_shard(str(bogus))
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        inspect_shard(str(tmp_path / "text.h5"))
    images = np.zeros((3, 1, 8, 8), np.uint8)
    write_shard(str(tmp_path / "notest.h5"), {"train": Split(images)})
    with pytest.raises(ValueError, match="no 'test/images'"):
        inspect_shard(str(tmp_path / "notest.h5"))
    write_shard(str(tmp_path / "edited.h5"), {"train": Split(images), "test": Split(images)})
    with h5py.File(tmp_path / "edited.h5", "a") as f:
        f["train/images"][0, 0, 0, 0] = 7
    inspect_shard(str(tmp_path / "edited.h5"))  # structure is fine
    with pytest.raises(ValueError, match="does not match its content_hash"):
        inspect_shard(str(tmp_path / "edited.h5"), verify_hash=True)


def test_random_hflip_mirrors_about_half_and_only_left_right():
    x = torch.arange(200 * 4, dtype=torch.float32).reshape(200, 1, 2, 2)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out != x).flatten(1).any(1)
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    assert 70 < int(flipped.sum()) < 130


def test_reading_outside_a_split_names_the_shard(shards):
    reader = ShardReader(shards[0], "test")
    with pytest.raises(IndexError, match=rf"shard '.*client_0.h5': index {len(reader)} is outside its 'test' split"):
        reader.read(np.arange(len(reader) + 1))
    with pytest.raises(IndexError, match="index -1 is outside"):
        reader.read(np.array([-1]))


def test_preparing_and_reading_shards_imports_no_torch():
    """prepare, and every command that only reads shards' and results' files (through
    results.schema), start without torch: 1.5 to 2 s of CPU a start (prepare: 3.5 -> 1.5 s)."""
    check = "import sys, collafuse_hpc.data.prepare, collafuse_hpc.results.schema; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr


def test_the_digits_are_sklearns_read_without_importing_it(tmp_path):
    """read_digits reads the wheel's file itself (scikit-learn's import is a second of CPU
    a process): the same 1,797 images and labels as sklearn.datasets.load_digits."""
    check = (
        "import sys, numpy as np; from collafuse_hpc.data.sources import read_digits; c = read_digits(); "
        "print('sklearn' in sys.modules); np.save(sys.argv[1], c.arrays); np.save(sys.argv[2], c.labels)"
    )
    out = [str(tmp_path / f"{k}.npy") for k in ("x", "y")]
    done = subprocess.run([sys.executable, "-c", check, *out], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr
    from sklearn.datasets import load_digits

    reference = load_digits()
    arrays, labels = (np.load(p) for p in out)
    assert arrays.shape == (1797, 8, 8) and arrays.dtype == np.uint8
    np.testing.assert_array_equal(arrays, (reference.images * (255.0 / 16.0)).round().astype(np.uint8))
    np.testing.assert_array_equal(labels, reference.target)


def test_the_digits_fall_back_to_sklearns_reader_and_a_missing_sklearn_is_named(tmp_path, monkeypatch):
    """An install whose package is not a plain folder (meson-python's editable loader names a
    virtual path) reads through sklearn.datasets; a stray sklearn/ folder is not scikit-learn."""
    from importlib.machinery import ModuleSpec

    from collafuse_hpc.data import sources

    want = sources.read_digits()
    virtual = ModuleSpec("sklearn", loader=object(), is_package=True)
    virtual.submodule_search_locations = [str(tmp_path / "not-a-folder")]
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: virtual)
    got = sources.read_digits()
    np.testing.assert_array_equal(got.arrays, want.arrays)
    np.testing.assert_array_equal(got.labels, want.labels)
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: ModuleSpec("sklearn", None))
    with pytest.raises(ValueError, match=r"pip install 'collafuse-hpc\[quickstart\]'"):
        sources.read_digits()


def test_a_decode_cache_batch_removed_under_a_running_prepare_is_said_so_not_called_damaged(tmp_path):
    """Another prepare into the same --out may remove a batch this one holds: that was
    "the decoded-image cache file ... is damaged ([Errno 2] ...); remove it"."""
    from collafuse_hpc.data.decode_cache import DONE, DecodeCache

    cache = DecodeCache(str(tmp_path / "cache"), 2, (1, 2, 2))
    ones = np.ones(2, np.int64)
    cache.add(np.arange(2), ones.astype(np.int8) * DONE, ones.astype(np.int32), np.ones((2, 2), np.int64),
              np.full((2, 1, 2, 2), 7, np.uint8))  # fmt: skip
    out = np.zeros((2, 1, 2, 2), np.uint8)
    cache.read(np.arange(2), out)
    assert (out == 7).all()
    for batch in (tmp_path / "cache").iterdir():
        batch.unlink()
    with pytest.raises(ValueError, match=r"was removed while this command ran .*run the same command again"):
        cache.read(np.arange(2), out)


def test_the_decode_cache_keeps_one_copy_of_each_image_and_names_a_damaged_file(tmp_path, capsys):
    """Batches whose images were all decoded again stayed for ever (the cache grew with
    each changed source), a killed run's temporary file stayed, an earlier version's
    cache was ignored without a word, and a damaged batch ended in zipfile's traceback."""
    root = tmp_path / "pictures"
    make_folder(str(root), classes=2, per_class=20)
    out = tmp_path / "out"
    prepare(read_folder(str(root)), str(out), 1, "iid", size=8, workers=1)
    (cache,) = (out / ".cache").iterdir()
    (batch,) = cache.glob("batch-*.npz")
    here = socket.gethostname()
    (cache / f"{batch.name}.tmp-{here}-999999999").write_bytes(b"half")  # a pid that cannot be alive
    (cache / f"{batch.name}.tmp-other-host-1").write_bytes(b"half")  # a shared file system: perhaps still written
    (out / ".cache" / f"{cache.name}.h5").write_bytes(b"old")
    for path in root.rglob("*.jpg"):  # every source changed: every image is decoded again
        os.utime(path, ns=(1, 1))
    for path in out.glob("client_*.h5"):
        path.unlink()
    prepare(read_folder(str(root)), str(out), 1, "iid", size=8, workers=1)
    (kept,) = [p.name for p in cache.iterdir() if p.name != f"{batch.name}.tmp-other-host-1"]
    assert kept != batch.name
    (cache / f"{batch.name}.tmp-other-host-1").unlink()
    assert f"{cache}.h5, the cache of an earlier version, is not read: remove it" in capsys.readouterr().err
    (batch,) = cache.glob("batch-*.npz")
    later = cache / f"batch-{int(batch.name.split('-')[1]) + 1:020d}-1.npz"  # a kill before the old one went
    shutil.copy(batch, later)
    for path in out.glob("client_*.h5"):
        path.unlink()
    prepare(read_folder(str(root)), str(out), 1, "iid", size=8, workers=1)  # failed: removed twice
    assert [p.name for p in cache.iterdir()] == [later.name]
    batch = later
    data = batch.read_bytes()
    batch.write_bytes(data[:4000] + b"\xa5" * 500 + data[4500:])  # inside the pixels
    for path in out.glob("client_*.h5"):
        path.unlink()
    with pytest.raises(ValueError, match=r"cache file .* is damaged .*remove it and run the same command again"):
        prepare(read_folder(str(root)), str(out), 1, "iid", size=8, workers=1)
    batch.write_bytes(data[:-200])  # cut short: not read, removed, its images decoded again
    prepare(read_folder(str(root)), str(out), 1, "iid", size=8, workers=1)
    assert len(list(cache.iterdir())) == 1 and not batch.exists()
