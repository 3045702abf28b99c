"""Auxiliary generated data (data.aux): memory map, stream, fraction, resume, bad files."""
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rb_labelrefine.data import RandomCropFlip
from rb_labelrefine.data.aux import AuxData, AuxStream, aux_count, convert_npz, npz_member_memmap
from rb_labelrefine.data.errors import CorruptDatasetError, DatasetNotFoundError


def write_aux(path, n=97, shape=(8, 8, 1), classes=10, seed=0, compressed=False, **extra):
    rng = np.random.default_rng(seed)
    arrays = {"image": rng.integers(0, 256, (n,) + shape, dtype=np.uint8),
              "label": (np.arange(n) % classes).astype(np.int64), **extra}
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


@pytest.fixture
def aux_file(tmp_path):
    path = tmp_path / "gen.npz"
    return path, write_aux(path)


def test_images_are_memory_mapped_not_loaded(aux_file):
    path, arrays = aux_file
    data = AuxData(path, num_classes=10, image_shape=(8, 8, 1))
    assert isinstance(data.images, np.memmap) and Path(data.images.filename) == path.resolve()
    assert np.array_equal(np.asarray(data.images), arrays["image"])
    idx = np.array([5, 0, 96, 5])
    x, y = data.batch(idx)
    assert x.shape == (4, 1, 8, 8) and x.dtype == torch.float32
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(arrays["image"][idx]).permute(0, 3, 1, 2))
    assert y.tolist() == arrays["label"][idx].tolist()


def test_member_offset_handles_zip64_headers(tmp_path):
    path = tmp_path / "z64.npz"
    img = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        with zf.open("label.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.arange(5))
        with zf.open("image.npy", "w", force_zip64=True) as f:   # local header with a zip64 extra field
            np.lib.format.write_array(f, img)
    assert np.array_equal(npz_member_memmap(path, "image"), img)


def test_aux_count_gives_the_fraction():
    assert aux_count(256, 0.75) == 768                 # ADR App. F: batch 1024, 75 % synthetic
    assert aux_count(128, 0.0) == 0
    for b in (1, 7, 128):
        for f in (0.3, 0.5, 0.7):
            k = aux_count(b, f)
            assert abs(k / (b + k) - f) <= 1.0 / (b + k)
    with pytest.raises(ValueError, match="aux_fraction"):
        aux_count(10, 1.0)


def test_stream_is_without_replacement_deterministic_and_seeded(aux_file):
    path, _ = aux_file
    data = AuxData(path)
    s = AuxStream(data, seed=1)
    first = np.concatenate([s.next_indices(10) for _ in range(10)])   # 100 draws over 97 images
    assert sorted(first[:97].tolist()) == list(range(97))          # one full pass = a permutation
    assert s.state_dict()["pass"] == 1 and s.state_dict()["offset"] == 3
    again = AuxStream(data, seed=1)
    assert np.array_equal(np.concatenate([again.next_indices(10) for _ in range(10)]), first)
    other = AuxStream(data, seed=2)
    assert not np.array_equal(other.next_indices(97), first[:97])
    assert not np.array_equal(first[:97], AuxStream(data, seed=1).permutation(1))   # a fresh order per pass


def test_stream_resumes_bit_exactly_with_augmentation(aux_file):
    path, _ = aux_file
    make = lambda: AuxStream(AuxData(path, transform=RandomCropFlip(padding=2)), seed=0)
    torch.manual_seed(0)
    ref = make()
    ref_batches = [ref.draw(13) for _ in range(12)]              # crosses passes
    torch.manual_seed(0)
    part = make()
    for _ in range(5):
        part.draw(13)
    state, rng = part.state_dict(), torch.get_rng_state()       # what a checkpoint holds
    resumed = make()
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    for want in ref_batches[5:]:
        got = resumed.draw(13)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_bad_files_get_clear_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.aux"):
        AuxData(tmp_path / "missing.npz")
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(CorruptDatasetError, match="not an .npz"):
        AuxData(tmp_path / "x.npz")
    np.savez(tmp_path / "keys.npz", data=np.zeros((2, 8, 8, 1), np.uint8), targets=np.zeros(2, np.int64))
    with pytest.raises(CorruptDatasetError, match=r"keys.npz: no array 'image' \(found \['data', 'targets'\]\)"):
        AuxData(tmp_path / "keys.npz")
    np.savez(tmp_path / "f.npz", image=np.zeros((2, 8, 8, 1), np.float32), label=np.zeros(2, np.int64))
    with pytest.raises(CorruptDatasetError, match="'image' must be uint8"):
        AuxData(tmp_path / "f.npz")
    np.savez(tmp_path / "cf.npz", image=np.zeros((2, 3, 8, 8), np.uint8), label=np.zeros(2, np.int64))
    with pytest.raises(CorruptDatasetError, match="channels-last"):
        AuxData(tmp_path / "cf.npz")
    write_aux(tmp_path / "lab.npz", classes=12)
    with pytest.raises(CorruptDatasetError, match=r"lab.npz: array 'label' has .* outside \[0, 10\) \(first at index 10: 10\)"):
        AuxData(tmp_path / "lab.npz", num_classes=10)
    np.savez(tmp_path / "fl.npz", image=np.zeros((2, 8, 8, 1), np.uint8), label=np.zeros(2, np.float32))
    with pytest.raises(CorruptDatasetError, match="integer class indices"):
        AuxData(tmp_path / "fl.npz")
    np.savez(tmp_path / "n.npz", image=np.zeros((3, 8, 8, 1), np.uint8), label=np.zeros(2, np.int64))
    with pytest.raises(CorruptDatasetError, match=r"shape \(3,\)"):
        AuxData(tmp_path / "n.npz")
    write_aux(tmp_path / "s.npz", shape=(32, 32, 3))
    with pytest.raises(CorruptDatasetError, match=r"\(32, 32, 3\) images .* training data \(8, 8, 1\)"):
        AuxData(tmp_path / "s.npz", image_shape=(8, 8, 1))
    np.savez(tmp_path / "o.npz", image=np.zeros((2, 8, 8, 1), np.uint8), label=np.array([0, None], dtype=object))
    with pytest.raises(CorruptDatasetError, match="not a plain number array"):
        AuxData(tmp_path / "o.npz")


def test_compressed_file_is_refused_with_the_conversion_command_and_converts(tmp_path):
    src = tmp_path / "c.npz"
    arrays = write_aux(src, compressed=True)
    with pytest.raises(CorruptDatasetError, match=r"compressed .* python -m rb_labelrefine.data.aux .*c.npz .*c_stored.npz"):
        AuxData(src)
    dst = convert_npz(src, tmp_path / "c_stored.npz", chunk_bytes=1000)   # many chunks
    data = AuxData(dst, num_classes=10)
    assert isinstance(data.images, np.memmap)
    assert np.array_equal(np.asarray(data.images), arrays["image"])
    assert data.labels.tolist() == arrays["label"].tolist()
    assert not (tmp_path / "c_stored.npz.partial").exists()


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_every_image_does_not_grow_the_resident_set_by_the_file(tmp_path):
    n = 12000                                            # 12000 x 32x32x3 = 35 MB
    path = tmp_path / "big.npz"
    write_aux(path, n=n, shape=(32, 32, 3))
    stream = AuxStream(AuxData(path), seed=0)
    before = _rss_mb()
    for _ in range(n // 256 + 1):                        # one full pass: every page of the file read
        stream.draw(256)
    assert stream.state_dict()["pass"] == 1
    assert _rss_mb() - before < 12                       # vs 35 MB if the pages stayed mapped
