"""Checkpoint integrity: a seeded corruption fuzzer over a real checkpoint, a save killed midway, the seal and the
atomic folder write."""

import json
import os
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dmq
from dmq import integrity
from tests.dmq.helpers import backbone_loop, tiny_unet

ROOT = Path(__file__).resolve().parents[2]
CFG = dmq.QuantConfig(weight=dmq.QuantSpec("int8", "channel"), act=dmq.QuantSpec("int8", timestep_bins=2),
                      attn=dmq.QuantSpec("int8"), name="fuzz-w8a8")
MUTATIONS = 1000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint: a diffusers U-Net with shortcut splits, attention quantizers and two timestep bins."""
    model = dmq.quantize(tiny_unet(), CFG)
    dmq.calibrate(model, backbone_loop(model, [100, 700]))
    dmq.freeze(model)
    path = tmp_path_factory.mktemp("fuzz") / "unet.safetensors"
    dmq.save(model, path)
    return path


# ------------------------------------------------------------------------------------------------ the mutations
def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _rebuild(data: bytes, edit) -> bytes:
    """A well-formed safetensors file from ``data`` after ``edit(metadata, chunks)``, where ``chunks`` maps each
    tensor name to ``(header entry, raw bytes)`` (byte surgery: no tensor is decoded)."""
    header, body = _split(data)
    meta = dict(header.pop("__metadata__", {}))
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    chunks = {k: (dict(header[k]), body[slice(*header[k]["data_offsets"])]) for k in order}
    edit(meta, chunks)
    out, parts, pos = {"__metadata__": meta}, [], 0
    for k, (entry, raw) in chunks.items():
        out[k] = {**entry, "data_offsets": [pos, pos + len(raw)]}
        parts.append(raw)
        pos += len(raw)
    text = json.dumps(out, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(parts)


def _leaves(obj, path=()):
    """Paths of every scalar in a JSON value."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, (*path, i))
    else:
        yield path


def _changed(value, rng: random.Random):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return rng.choice([v for v in (value + 1, value - 7, 9000.0) if v != value])
    if isinstance(value, str):
        return rng.choice([value + "x", value[:-1], value.upper() + "_", "int4"]) if value else "x"
    return rng.choice([0, "x", []])  # None


_LEAVES: dict[str, list] = {}  # metadata text -> the paths of its scalars (the same few texts, 1,000 times)


def _edit_map(rng: random.Random, key: str, op: str):
    """Edit the JSON stored in metadata entry ``key``: change a scalar, drop or rename a dict key."""
    def edit(meta, chunks):
        doc = json.loads(meta[key])
        if meta[key] not in _LEAVES:
            _LEAVES[meta[key]] = list(_leaves(doc))
        path = rng.choice(_LEAVES[meta[key]])
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        if op == "value" or not isinstance(parent, dict):
            parent[last] = _changed(parent[last], rng)
        elif op == "drop":
            del parent[last]
        else:
            parent[str(last) + "_"] = parent.pop(last)
        meta[key] = json.dumps(doc)
    return edit


def mutate(data: bytes, seed: int) -> tuple[str, bytes]:
    """Mutation ``seed`` of a checkpoint: one of truncation, bit flips in the data or in the header, an edited
    metadata value, a dropped or renamed key (tensor, metadata entry or map entry)."""
    rng = random.Random(seed)
    header, _ = _split(data)
    start = 8 + struct.unpack("<Q", data[:8])[0]
    kind = ["truncate", "flip-data", "flip-header", "edit-value", "drop", "rename"][seed % 6]
    if kind == "truncate":
        return kind, data[:rng.randrange(len(data))]
    if kind in ("flip-data", "flip-header"):
        pos = rng.randrange(start, len(data)) if kind == "flip-data" else rng.randrange(start)
        out = bytearray(data)
        out[pos] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    names = [k for k in header if k != "__metadata__"]
    if kind == "edit-value":
        return kind, _rebuild(data, _edit_map(rng, rng.choice(["dmq", "dmq", "dmq_integrity"]), "value"))
    target = rng.choice(["tensor", "tensor", "metadata", "map"])
    if target == "tensor":
        name = rng.choice(names)

        def edit(meta, chunks):
            t = chunks.pop(name)
            if kind == "rename":
                chunks[name + ".renamed" if rng.random() < 0.5 else name.replace(".", "_", 1)] = t
        return f"{kind}-tensor", _rebuild(data, edit)
    if target == "metadata":
        key = rng.choice(["dmq", "dmq_integrity"])

        def edit(meta, chunks):
            value = meta.pop(key)
            if kind == "rename":
                meta[key + "_"] = value
        return f"{kind}-metadata", _rebuild(data, edit)
    return f"{kind}-map", _rebuild(data, _edit_map(rng, rng.choice(["dmq", "dmq_integrity"]), kind))


def test_corruption_fuzzer(checkpoint, tmp_path, one_thread):
    """1,000 seeded mutations of a real checkpoint: every one raises ValueError, none loads, the model is untouched."""
    data = checkpoint.read_bytes()
    model = tiny_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the rebuild used by the structured mutations keeps a file valid when it changes nothing
    same = tmp_path / "same.safetensors"
    same.write_bytes(_rebuild(data, lambda meta, chunks: None))
    dmq.load(tiny_unet(), same)
    failures, kinds = [], {}
    for seed in range(MUTATIONS):
        kind, mutant = mutate(data, seed)
        assert mutant != data, (seed, kind)
        kinds[kind] = kinds.get(kind, 0) + 1
        path = tmp_path / f"mutant{seed}.safetensors"  # a new file each time: overwriting is slow on some disks
        path.write_bytes(mutant)
        try:
            dmq.load(model, path)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001 (any other type is a failure of this case)
            failures.append(f"seed {seed} ({kind}): {type(e).__name__}: {e}")
            continue
        finally:
            path.unlink()
        failures.append(f"seed {seed} ({kind}): loaded")
        model = tiny_unet()
    assert not failures, f"{len(failures)} of {MUTATIONS} mutations were not a ValueError: {failures[:10]}"
    assert all(kinds.get(k, 0) >= 100 for k in ("truncate", "flip-data", "flip-header", "edit-value"))
    assert sum(v for k, v in kinds.items() if k.startswith(("drop", "rename"))) >= 300
    assert getattr(model, "_dmq", None) is None
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


KILLED_SAVE = """
import os, sys, time
import safetensors.torch
import torch
import dmq
from tests.dmq.helpers import tiny_unet
path = sys.argv[1]
torch.manual_seed(0)
model = dmq.freeze(dmq.quantize({model}, "w4a16"))
real = safetensors.torch.save_file

def slow(tensors, filename, metadata=None):  # write half the file, then hang until killed
    real(tensors, filename, metadata=metadata)
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)
    print("writing", filename, flush=True)
    time.sleep(600)

safetensors.torch.save_file = slow
dmq.save(model, path)
"""


def _killed_save(model: str, path: Path) -> Path:
    """Run ``dmq.save(model, path)`` in a subprocess that is killed once it has written half of its first file;
    returns that (temporary) file."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE.format(model=model), str(path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = child.stdout.readline()
        assert line.startswith("writing"), child.stderr.read()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    return Path(line.split(maxsplit=1)[1].strip())


def test_a_save_killed_midway_leaves_the_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    dmq.save(dmq.freeze(dmq.quantize(tiny_unet(1), "w4a16")), path)  # the old file: another model
    old = path.read_bytes()
    tmp = _killed_save("torch.nn.Sequential(torch.nn.Linear(64, 64))", path)
    assert tmp.parent == tmp_path and tmp.name.startswith(".m.safetensors.") and tmp.exists()
    assert path.read_bytes() == old
    loaded = dmq.load(path)
    assert dmq.summary(loaded)["config"] == "w4a16"
    with pytest.raises(ValueError):  # the abandoned half-written temporary file is not a checkpoint
        dmq.load(tmp)


def test_seal_names_what_is_wrong():
    tensors = {"a": torch.arange(6, dtype=torch.int8).reshape(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16)}
    meta = integrity.seal({"dmq": "{}"}, tensors)
    integrity.verify(meta, tensors, "f")
    with pytest.raises(ValueError, match="reserved"):
        integrity.seal(meta, tensors)
    with pytest.raises(ValueError, match="f: tensor 'a' is int8 \\[3, 2\\], the seal says int8 \\[2, 3\\]"):
        integrity.verify(meta, {**tensors, "a": tensors["a"].reshape(3, 2)}, "f")
    with pytest.raises(ValueError, match="tensor 'a' is uint8"):
        integrity.verify(meta, {**tensors, "a": tensors["a"].view(torch.uint8)}, "f")
    with pytest.raises(ValueError, match="tensor 'b' is missing from the file"):
        integrity.verify(meta, {"a": tensors["a"]}, "f")
    with pytest.raises(ValueError, match="the metadata .* does not match its digest"):
        integrity.verify({**meta, "dmq": "{ }"}, tensors, "f")
    with pytest.raises(ValueError, match="integrity seal is unreadable"):
        integrity.verify({**meta, "dmq_integrity": "[1]"}, tensors, "f")


def test_atomic_directory_swaps_whole_folders_and_verifies(tmp_path):
    target = tmp_path / "model"
    with integrity.atomic_directory(target) as d:
        (d / "config.json").write_text("{}")
        (d / "sub").mkdir()
        (d / "sub" / "w.bin").write_bytes(b"\x00\x01")
    integrity.verify_folder(target)
    with pytest.raises(RuntimeError, match="boom"), integrity.atomic_directory(target) as d:
        (d / "config.json").write_text('{"new": 1}')
        raise RuntimeError("boom")
    assert (target / "config.json").read_text() == "{}"  # the failed write changed nothing
    with integrity.atomic_directory(target) as d:
        (d / "config.json").write_text('{"new": 2}')
    assert (target / "config.json").read_text() == '{"new": 2}' and not (target / "sub").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left behind
    integrity.verify_folder(target)
    (target / "config.json").write_text('{"new": 3}')
    with pytest.raises(ValueError, match="file 'config.json' does not match its sha256"):
        integrity.verify_folder(target)
    (target / "config.json").write_text('{"new": 2}')
    (target / "extra.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="file 'extra.bin' is not in the seal"):
        integrity.verify_folder(target)
    with pytest.raises(ValueError, match="is a file; expected a folder"):
        integrity.verify_folder(target / "extra.bin")


# ------------------------------------------------------------------------------------------- folder checkpoints
FOLDER_MUTATIONS = 200


@pytest.fixture(scope="module")
def frozen_unet():
    model = dmq.quantize(tiny_unet(), CFG)
    dmq.calibrate(model, backbone_loop(model, [100, 700]))
    return dmq.freeze(model)


@pytest.fixture(scope="module")
def folder(frozen_unet, tmp_path_factory):
    """A sealed save_pretrained folder of the same real model, sharded (config.json, shards, their index)."""
    path = tmp_path_factory.mktemp("fuzz-folder") / "unet"
    dmq.save(frozen_unet, path, max_shard_size=20_000)
    return path


def _run(model, x, t=500):
    with torch.no_grad():
        return model(x, torch.tensor([t]), class_labels=torch.tensor([3])).sample


def test_sealed_folder_loads_bit_identically_with_from_pretrained_and_dmq_load(frozen_unet, folder, tmp_path):
    files = sorted(p.name for p in folder.iterdir())
    assert integrity.SEAL_FILE in files and "config.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = _run(frozen_unet, x)
    for loaded in (type(frozen_unet).from_pretrained(folder), dmq.load(folder)):
        assert torch.equal(_run(loaded, x), out)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), frozen_unet.state_dict().values()))
    # two saves of one model are the same bytes, file for file (safetensors' metadata order is made canonical)
    again = tmp_path / "again"
    dmq.save(frozen_unet, again, max_shard_size=20_000)
    assert {p.name: p.read_bytes() for p in again.iterdir()} == {p.name: p.read_bytes() for p in folder.iterdir()}
    # an edited quantization_config fails with plain from_pretrained too, not only with dmq.load
    cfg = json.loads((again / "config.json").read_text())
    cfg["quantization_config"]["pre_quantization_dtype"] = "float16"
    (again / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="file 'config.json' does not match its sha256 digest"):
        type(frozen_unet).from_pretrained(again)
    # a folder that is not dmq's is never replaced (its files would be lost)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a folder written by dmq"):
        dmq.save(frozen_unet, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def mutate_folder(src: Path, dst: Path, seed: int) -> str:
    """Copy ``src`` to ``dst`` with mutation ``seed``: a truncated or bit-flipped file (any file, the seal included),
    an edited ``quantization_config`` value in config.json, a dropped, renamed or added file."""
    import shutil

    rng = random.Random(seed)
    shutil.copytree(src, dst)
    names = sorted(p.name for p in dst.iterdir())
    kind = ["truncate", "flip", "edit-config", "drop", "rename", "add"][seed % 6]
    target = dst / rng.choice(names)
    data = target.read_bytes()
    if kind == "truncate":
        target.write_bytes(data[:rng.randrange(len(data))])
    elif kind == "flip":
        out = bytearray(data)
        pos = rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(out))
    elif kind == "edit-config":
        cfg = json.loads((dst / "config.json").read_text())
        qc = cfg["quantization_config"]
        path = rng.choice(list(_leaves(qc)))
        parent = qc
        for p in path[:-1]:
            parent = parent[p]
        parent[path[-1]] = _changed(parent[path[-1]], rng)
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    elif kind == "drop":
        target.unlink()
    elif kind == "rename":
        target.rename(target.with_name(target.name.replace(".", "_", 1) if rng.random() < 0.5 else "x" + target.name))
    else:
        (dst / rng.choice(["extra.safetensors", "notes.json", "unet.bin"])).write_bytes(data[:64])
    return f"{kind}:{target.name}"


def test_folder_corruption_fuzzer(folder, tmp_path, one_thread):
    """200 seeded mutations of a sealed folder checkpoint: every one raises ValueError, none loads."""
    failures, kinds = [], {}
    for seed in range(FOLDER_MUTATIONS):
        dst = tmp_path / f"mutant{seed}"
        kind = mutate_folder(folder, dst, seed)
        kinds[kind.split(":")[0]] = kinds.get(kind.split(":")[0], 0) + 1
        try:
            dmq.load(dst)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001 (any other type is a failure of this case)
            failures.append(f"seed {seed} ({kind}): {type(e).__name__}: {e}")
            continue
        failures.append(f"seed {seed} ({kind}): loaded")
    assert not failures, f"{len(failures)} of {FOLDER_MUTATIONS} folder mutations did not raise: {failures[:10]}"
    assert all(v >= 30 for v in kinds.values()) and len(kinds) == 6


def test_a_folder_save_killed_midway_leaves_the_old_folder(tmp_path):
    path = tmp_path / "unet"
    dmq.save(dmq.freeze(dmq.quantize(tiny_unet(1), "w4a16")), path)  # the old folder: other weights
    old = {p.name: p.read_bytes() for p in path.iterdir()}
    tmp = _killed_save("tiny_unet()", path).parent  # save_pretrained writes half a shard of the new folder
    assert tmp.parent == tmp_path and tmp.name.startswith(".unet.") and tmp.exists()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == old
    assert dmq.summary(dmq.load(path))["config"] == "w4a16"
    with pytest.raises(ValueError, match="no dmq_integrity.json"):  # the abandoned half-written folder
        dmq.load(tmp)
