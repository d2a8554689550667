import json
import os

import numpy as np
import pytest

import tinysft.io.checkpoint as checkpoint
from tinysft.io import CheckpointError, atomic_write_bytes, atomic_write_text, load_checkpoint, save_checkpoint


def make_state(step):
    rng = np.random.default_rng(step)
    return {
        "step": step,
        "rng": rng.bit_generator.state,  # holds 128-bit integers
        "optimizer": {"lr": np.float32(1e-3), "t": np.int64(step), "moments": [np.full(3, step, np.float32),
                                                                               np.zeros((2, 2))]},
        "history": (1.5, float("nan"), None, True),
        "loader": {"epoch": 1, "position": 7},
    }


def assert_checkpoint(directory, step):
    tensors, state = load_checkpoint(directory)
    assert list(tensors) == ["w"]
    np.testing.assert_array_equal(tensors["w"], np.full((2, 3), step, np.float32))
    assert state["step"] == step
    np.testing.assert_array_equal(state["optimizer"]["moments"][0], np.full(3, step, np.float32))
    return state


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "ck", {"w": np.full((2, 3), 5, np.float32)}, make_state(5))
    state = assert_checkpoint(tmp_path / "ck", 5)
    assert state["optimizer"]["lr"] == pytest.approx(1e-3) and type(state["optimizer"]["t"]) is int
    assert state["optimizer"]["moments"][1].shape == (2, 2)
    assert state["history"][0] == 1.5 and np.isnan(state["history"][1]) and state["history"][2:] == [None, True]
    restored = np.random.default_rng()
    restored.bit_generator.state = state["rng"]
    np.testing.assert_array_equal(restored.random(4), np.random.default_rng(5).random(4))
    files = sorted(os.listdir(tmp_path / "ck"))
    assert files == ["model-000001.safetensors", "state.json"]
    manifest = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert manifest["state"]["optimizer"]["moments"][0] == {"__tensor__": "__state__/optimizer/moments/0"}


def test_resave_replaces_and_cleans(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, {"w": np.full((2, 3), step, np.float32)}, make_state(step))
    assert_checkpoint(tmp_path, 3)
    assert sorted(os.listdir(tmp_path)) == ["model-000003.safetensors", "state.json"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("target, crash_on_call, survivor", [
    ("os.replace", 1, 1),      # while moving the new tensors file into place
    ("os.replace", 2, 1),      # while replacing state.json (the commit point)
    ("os.fsync", 1, 1),        # while flushing the tensors file
    ("os.fsync", 3, 1),        # while flushing state.json
    ("os.unlink", 1, 2),       # after the commit, while deleting the old tensors file
])
def test_crash_mid_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, target, crash_on_call, survivor):
    save_checkpoint(tmp_path, {"w": np.full((2, 3), 1, np.float32)}, make_state(1))
    real = getattr(os, target.split(".")[1])
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash_on_call:
            raise Crash(target)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, flaky)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, {"w": np.full((2, 3), 2, np.float32)}, make_state(2))
    monkeypatch.undo()
    assert_checkpoint(tmp_path, survivor)
    save_checkpoint(tmp_path, {"w": np.full((2, 3), 3, np.float32)}, make_state(3))  # recovers and cleans up
    assert_checkpoint(tmp_path, 3)
    assert len(os.listdir(tmp_path)) == 2


def test_crash_before_manifest_keeps_old(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"w": np.full((2, 3), 1, np.float32)}, make_state(1))

    def killed(*args):
        raise Crash("killed before the commit")

    monkeypatch.setattr(checkpoint, "atomic_write_text", killed)
    with pytest.raises(Crash):
        save_checkpoint(tmp_path, {"w": np.full((2, 3), 2, np.float32)}, make_state(2))
    assert_checkpoint(tmp_path, 1)


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint.*state.json not found"):
        load_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tmp_path, {"w": np.zeros(2)}, {"m": np.ones(2)})
    manifest = tmp_path / "state.json"
    tensors_file = tmp_path / "model-000001.safetensors"
    good_manifest, good_tensors = manifest.read_bytes(), tensors_file.read_bytes()

    manifest.write_text("{truncated")
    with pytest.raises(CheckpointError, match="corrupt checkpoint manifest"):
        load_checkpoint(tmp_path)
    manifest.write_text('{"hello": 1}')
    with pytest.raises(CheckpointError, match="not a tinysft-checkpoint manifest"):
        load_checkpoint(tmp_path)
    manifest.write_bytes(good_manifest.replace(b'"version": 1', b'"version": 99'))
    with pytest.raises(CheckpointError, match="unsupported checkpoint version 99"):
        load_checkpoint(tmp_path)

    manifest.write_bytes(good_manifest)
    tensors_file.write_bytes(good_tensors[:-3])
    with pytest.raises(CheckpointError, match="corrupt checkpoint tensors.*outside the data buffer"):
        load_checkpoint(tmp_path)
    tensors_file.unlink()
    with pytest.raises(CheckpointError, match="model-000001.safetensors.*missing"):
        load_checkpoint(tmp_path)


def test_state_tensor_missing_from_file(tmp_path):
    save_checkpoint(tmp_path, {"w": np.zeros(2)}, {"m": np.ones(2)})
    manifest = json.loads((tmp_path / "state.json").read_text())
    manifest["state"]["m"]["__tensor__"] = "__state__/gone"
    (tmp_path / "state.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="'__state__/gone'"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("state, match", [
    ({"x": object()}, "'x' has unsupported type object"),
    ({"a": {1: 2}}, "key 1 at 'a' is not a string"),
    ({"__tensor__": 1}, "reserved"),
    ({"a": [np.complex64(1)]}, "'a/0' has unsupported type complex64"),
])
def test_unstorable_state(tmp_path, state, match):
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(tmp_path, {}, state)
    assert os.listdir(tmp_path) == []


def test_reserved_tensor_prefix(tmp_path):
    with pytest.raises(CheckpointError, match="__state__/"):
        save_checkpoint(tmp_path, {"__state__/x": np.zeros(1)}, {})


def test_colliding_state_paths(tmp_path):
    state = {"a/b": np.zeros(1), "a": {"b": np.ones(1)}}
    save_checkpoint(tmp_path, {}, state)
    _, loaded = load_checkpoint(tmp_path)
    np.testing.assert_array_equal(loaded["a/b"], np.zeros(1))
    np.testing.assert_array_equal(loaded["a"]["b"], np.ones(1))


def test_atomic_write_helpers(tmp_path, monkeypatch):
    atomic_write_text(tmp_path / "n.txt", "héllo\n")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "n.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"

    def crash(*args):
        raise Crash()

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):
        atomic_write_text(tmp_path / "n.txt", "new")
    assert (tmp_path / "n.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "n.txt"]


CHILD = """
import sys, numpy as np
from tinysft.io import save_checkpoint
w = np.zeros(4_000_000, np.float32)
for step in range(1, 10**6):
    w[:] = step
    save_checkpoint(sys.argv[1], {"w": w}, {"step": step, "m": np.full(3, step)})
    print(step, flush=True)
"""


def test_sigkill_mid_save_leaves_a_consistent_checkpoint(tmp_path):
    """Kill a process that saves checkpoints in a loop, at several moments; the last commit must load."""
    import signal
    import subprocess
    import sys
    import time

    import tinysft.io
    root = os.path.dirname(os.path.dirname(os.path.dirname(tinysft.io.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for delay in (0.05, 0.13, 0.21):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], env=env, stdout=subprocess.PIPE)
        assert child.stdout.readline()  # at least one checkpoint committed
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        tensors, state = load_checkpoint(tmp_path)
        assert state["step"] >= 1
        assert (tensors["w"] == state["step"]).all() and (state["m"] == state["step"]).all()
