"""mambakit never reaches the network: models come from a path or the local Hugging Face cache.
Sockets are made to fail for these tests (without HF_HUB_OFFLINE set), so any attempt to
connect, resolve a name or download would show up as an error other than the ones expected."""

from __future__ import annotations

import socket

import pytest
import torch

from mambakit import MambaConfig, MambaLM


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during a mambakit test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    from huggingface_hub import constants
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    return cache, attempts


def _cache_model(cache, repo_id: str) -> MambaLM:
    """Writes a model into the cache's layout: models--org--name/{refs/main, snapshots/<rev>/}."""
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64))
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return model


def test_a_cached_hub_id_loads_without_the_network(no_network):
    cache, attempts = no_network
    saved = _cache_model(cache, "someone/tiny-mamba")
    loaded = MambaLM.from_pretrained("someone/tiny-mamba")
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(ids), saved.eval()(ids))
    assert attempts == []


def test_an_unknown_hub_id_is_an_error_not_a_download(no_network):
    _, attempts = no_network
    with pytest.raises(FileNotFoundError, match="nobody/no-such-model"):
        MambaLM.from_pretrained("nobody/no-such-model")
    assert attempts == []
