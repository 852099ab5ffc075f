"""Shared fixtures for the plain pytest tests in tests/ (the notebooks have nbs/conftest.py)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def root() -> Path:
    "The repository root (the folder holding pyproject.toml)."
    return ROOT
