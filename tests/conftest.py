"""Shared test setup: the score tables the CLI keeps on disk go to a temporary folder, never the user's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from klora import scores


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("KLORA_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "klora-cache"))
    yield
    scores.set_disk_cache(None)  # the CLI's main() and the webui's settings turn it on for the process
