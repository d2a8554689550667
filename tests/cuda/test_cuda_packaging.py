"""The kernel sources ship with the package: pyproject lists tinysft.csrc (mapped to csrc/) and, since that
needs an explicit package list, every package directory under tinysft/."""
import tomllib
from pathlib import Path

from tinysft.cuda import csrc_dir

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_ships_csrc_and_lists_every_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["tinysft.csrc"] == "csrc"
    assert {"*.cu", "emu/*"} <= set(setuptools["package-data"]["tinysft.csrc"])
    listed = set(setuptools["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "tinysft").rglob("__init__.py")}
    missing = on_disk - listed
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"
    assert "tinysft.csrc" in listed


def test_sources_are_found():
    from tinysft.cuda.ops import OPS

    assert all((csrc_dir() / op.SOURCE).is_file() for op in OPS)
    assert (csrc_dir() / "common.cuh").is_file() and (csrc_dir() / "emu" / "cuda_emu.h").is_file()


def test_every_kernel_source_is_registered():
    """A .cu file in csrc/ without its module in tinysft.cuda.ops.OPS would never be checked."""
    from tinysft.cuda.ops import OPS

    assert sorted(p.name for p in csrc_dir().glob("*.cu")) == sorted(op.SOURCE for op in OPS)
