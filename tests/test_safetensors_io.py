"""The mmap safetensors reader and the sharded writer, checked against the `safetensors` package
(an independent implementation of the format) and against hand-built files."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from memory_maps import file_mapped_at, resident_bytes_of
from safetensors import safe_open
from safetensors.torch import save_file

from runtime.errors import CheckpointError
from runtime.safetensors_io import INDEX_FILE, SINGLE_FILE, SafetensorsFile, ShardedWriter, save_sharded


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "f16": torch.randn(7, generator=g).to(torch.float16),
        "f32": torch.randn(2, 3, 4, generator=g),
        "f64": torch.randn(2, generator=g).double(),
        "i8": torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (4, 4), generator=g, dtype=torch.uint8),
        "i32": torch.randint(-1000, 1000, (3,), generator=g, dtype=torch.int32),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _raw_file(path, header: dict, data: bytes) -> None:
    """A safetensors file built by hand from the format spec: u64 header length, JSON, data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_reader_matches_the_safetensors_package(tmp_path):
    tensors = _sample_tensors()
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "note": "hi"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert f.metadata == {"format": "pt", "note": "hi"}
    with safe_open(tmp_path / "x.safetensors", "pt") as ref:
        names = ref.keys()
        assert sorted(f.keys()) == sorted(names)
        for name in names:
            expected = ref.get_tensor(name)
            got = f.get(name)
            assert got.dtype == expected.dtype and got.shape == expected.shape, name
            # Compare bytes: bit-exact, and NaN-safe for float8.
            assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


def test_reader_reads_a_hand_built_file_with_unaligned_offsets(tmp_path):
    # Offsets need not be aligned; the second tensor starts at an odd byte.
    a = torch.tensor([7], dtype=torch.uint8)
    b = torch.tensor([1.5, -2.0], dtype=torch.float32)
    data = a.numpy().tobytes() + b.numpy().tobytes()
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    _raw_file(tmp_path / "h.safetensors", header, data)
    f = SafetensorsFile(tmp_path / "h.safetensors")
    assert f.get("a").tolist() == [7]
    assert f.get("b").tolist() == [1.5, -2.0]


def test_reader_returns_views_of_a_private_file_mapping(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    before = path.read_bytes()
    f = SafetensorsFile(path)
    first, second = f.get("w"), f.get("w")
    # The tensor's memory is the file mapping itself, not a copy in anonymous memory.
    assert file_mapped_at(first.data_ptr()) == path.resolve()
    first[0] = -1.0
    assert second[0].item() == -1.0  # same bytes
    assert path.read_bytes() == before  # copy-on-write: the file is untouched


def test_release_drops_resident_pages_and_rereads_the_file(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.arange(4 * 1024 * 1024, dtype=torch.float32)}, path)  # 16 MiB
    f = SafetensorsFile(path)
    total = float(f.get("w").sum())  # touch every page
    resident = resident_bytes_of(path)
    assert resident > 15 * 2**20
    f.release("w")
    assert resident_bytes_of(path) < 2**20
    assert float(f.get("w").sum()) == total


@pytest.mark.parametrize(
    "mutilate, why",
    [
        (lambda raw: raw[:5], "too short"),
        (lambda raw: raw[:-100], "ends at byte"),  # truncated download
        (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "header length"),
        (lambda raw: raw[:8] + b"\xff" * (len(raw) - 8), "not valid JSON"),
    ],
)
def test_truncated_or_garbage_file_names_the_file(tmp_path, mutilate, why):
    path = tmp_path / "model-00002-of-00003.safetensors"
    save_file({"a": torch.zeros(64), "b": torch.ones(64)}, path)
    path.write_bytes(mutilate(path.read_bytes()))
    with pytest.raises(CheckpointError, match=why) as err:
        SafetensorsFile(path)
    assert "model-00002-of-00003.safetensors" in str(err.value) and "download" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},  # 3 floats are 12 bytes
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
        {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]},
        {"dtype": "F32", "shape": [2]},
    ],
)
def test_inconsistent_header_entry_is_refused(tmp_path, entry):
    _raw_file(tmp_path / "bad.safetensors", {"t": entry}, bytes(16))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_missing_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        SafetensorsFile(tmp_path / "nope.safetensors")


def _read_dir(directory) -> dict[str, torch.Tensor]:
    """All tensors of a written directory, read with the safetensors package via the index."""
    if (directory / SINGLE_FILE).exists():
        files = {SINGLE_FILE}
    else:
        files = set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values())
    out = {}
    for name in files:
        with safe_open(directory / name, "pt") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses files without it
            names = f.keys()
            out.update({k: f.get_tensor(k) for k in names})
    return out


def test_writer_shards_by_size_and_writes_a_consistent_index(tmp_path):
    tensors = {f"t{i}": torch.full((100 + i,), float(i)) for i in range(10)}  # ~400 B each
    big = torch.arange(1000, dtype=torch.float32)  # bigger than the cap: a shard of its own
    tensors["big"] = big
    written = save_sharded(tensors, tmp_path, max_shard_bytes=1000)
    names = sorted(p.name for p in tmp_path.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    count = len(shards)
    assert count > 2 and names == sorted([*shards, INDEX_FILE])
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert written[-1].name == INDEX_FILE
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    for shard in shards:
        with safe_open(tmp_path / shard, "pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).nbytes for k in keys)
            assert size <= 1000 or keys == ["big"]
            assert all(index["weight_map"][k] == shard for k in keys)
    back = _read_dir(tmp_path)
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_writer_without_cap_writes_one_file_and_no_index(tmp_path):
    tensors = {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.bfloat16)}
    save_sharded(tensors, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    back = _read_dir(tmp_path)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_writer_accepts_slices_that_share_storage(tmp_path):
    whole = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    halves = whole.chunk(2, dim=1)
    with ShardedWriter(tmp_path) as w:
        w.add("left", halves[0])
        w.add("right_t", halves[1].t())
    back = _read_dir(tmp_path)
    assert torch.equal(back["left"], whole[:, :3]) and torch.equal(back["right_t"], whole[:, 3:].t())


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), ShardedWriter(tmp_path, max_shard_bytes=100) as w:
        for i in range(5):
            w.add(f"t{i}", torch.zeros(20))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_directory_with_weights_unless_overwriting(tmp_path):
    save_sharded({f"t{i}": torch.zeros(50) for i in range(4)}, tmp_path, max_shard_bytes=200)
    with pytest.raises(CheckpointError, match="already contains weights"):
        ShardedWriter(tmp_path)
    save_sharded({"only": torch.ones(2)}, tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]  # stale shards and index gone
    assert torch.equal(_read_dir(tmp_path)["only"], torch.ones(2))


def test_writer_refuses_duplicate_names(tmp_path):
    with ShardedWriter(tmp_path) as w:
        w.add("a", torch.zeros(1))
        with pytest.raises(ValueError, match="twice"):
            w.add("a", torch.zeros(1))
