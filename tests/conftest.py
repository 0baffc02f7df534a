"""Shared test setup: the score tables the CLI keeps on disk go to a temporary folder, never the user's."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLORA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "klora-cache"))
