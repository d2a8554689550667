"""The tiny model folder and CSV dataset shared by the app tests (see helpers.py)."""
from pathlib import Path

import pytest

from .helpers import csv_rows, write_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def csv_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    path.write_text("\n".join(csv_rows()) + "\n")
    return path
