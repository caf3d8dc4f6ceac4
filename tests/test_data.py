"""Shards: format, validation, batch reads and the resumable epoch order."""

import h5py
import numpy as np
import pytest

from collafuse_hpc.data import EpochSampler, ShardReader, inspect_shard, to_model_range, write_shard


def test_prepared_digit_shards_are_non_iid_and_valid(shards):
    seen = []
    for path in shards:
        info = inspect_shard(path)
        assert (info.channels, info.image_size) == (1, 8) and info.has_labels
        with h5py.File(path) as f:
            seen.append(set(np.unique(f["train/labels"][()])))
            assert f["train/images"].chunks == (1, 1, 8, 8)
    assert all(not (a & b) for i, a in enumerate(seen) for b in seen[i + 1 :])  # disjoint digits
    assert set().union(*seen) == set(range(10))


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
    state = b.state_dict()
    c = EpochSampler(10, 4, seed=3)
    c.load_state_dict(state)
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
    write_shard(str(tmp_path / "nolabels.h5"), {"train": (images, None)})
    with pytest.raises(ValueError, match="no 'test/images'"):
        inspect_shard(str(tmp_path / "nolabels.h5"))
