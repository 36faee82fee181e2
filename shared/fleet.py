"""The fleet file: one YAML document that describes the verifier tier and every device.

The agent reads it for its own settings (``effective(fleet, device_id)``: its group's settings with
its overrides applied); the verifier reads the same file for per-device credentials (the hash of
each device's token) and limits. A device's own token is only referenced (``token_env`` or
``token_file``), never written in the file.

Errors name the file, the line and the field, e.g.
``fleet.yaml:14: devices.pi-kitchen.drafter: unknown model 'smolm2' (...)``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from shared.models import REGISTRY

FLEET_VERSION = 1


class FleetError(ValueError):
    """The fleet file cannot be used; the message says where and why."""


def _check_model(name: str) -> str:
    """A drafter: a built-in model, a GGUF path, ``ngram`` (no model) or ``ngram+MODEL``."""
    model = name.removeprefix("ngram+")
    if name == "ngram" or model in REGISTRY or model.endswith(".gguf") or "/" in model:
        return name
    raise ValueError(f"unknown model '{model}' (built-in: {', '.join(REGISTRY)}; a GGUF path ends in .gguf; "
                     "or ngram, ngram+MODEL)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Retry(_Strict):
    """How an agent retries a verifier round before moving its session to another replica."""

    attempts: int = Field(default=3, ge=0, le=20)
    backoff_s: float = Field(default=0.2, gt=0, le=60)  # first wait; doubles each attempt, with jitter
    max_backoff_s: float = Field(default=5.0, gt=0, le=600)
    deadline_s: float = Field(default=30.0, gt=0)  # no verifier for this long: the request fails


class DeviceLimits(_Strict):
    """What one device may use of a verifier replica; beyond it the device gets a 429 with
    ``Retry-After`` (the server's global limits, 413 and 503, stay as they are)."""

    sessions: int = Field(default=16, ge=1)  # sessions open at once
    rounds_per_s: float = Field(default=100.0, ge=0)  # verify rounds per second on average (0: no limit)
    burst: float = Field(default=200.0, ge=1)  # rounds allowed at once above that rate


class Verifier(_Strict):
    urls: list[str] = Field(min_length=1)  # replicas, or one load balancer
    timeout_s: float = Field(default=60.0, gt=0)
    retry: Retry = Field(default_factory=Retry)
    device_limits: DeviceLimits = Field(default_factory=DeviceLimits)  # enforced by the verifier

    @field_validator("urls")
    @classmethod
    def _http(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"'{url}' is not an http(s) URL")
        return urls


class LocalApi(_Strict):
    """The device's OpenAI-compatible API for its local apps."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    concurrency: int = Field(default=2, ge=1, le=64)  # requests generating at once
    queue: int = Field(default=8, ge=0, le=1024)  # waiting beyond those; more get a 429


class DeviceSettings(_Strict):
    """What a group sets for its devices (and a device may override)."""

    drafter: str = "smollm2-135m"
    threads: int | None = Field(default=None, ge=1, le=256)
    gpu_layers: int = Field(default=0, ge=0)
    context: int = Field(default=4096, ge=256, le=131072)
    max_draft_tokens: int = Field(default=10, ge=0, le=64)
    api: LocalApi = Field(default_factory=LocalApi)
    fallback: str = Field(default="none", pattern="^(none|local)$")  # local: the drafter alone, marked

    @field_validator("drafter")
    @classmethod
    def _known_model(cls, name: str) -> str:
        return _check_model(name)


class Device(BaseModel):
    """A device: its group, its credential, and any group setting overridden.

    The agent finds its token by reference (``token_env`` or ``token_file``); the verifier holds
    only its hash (``token_sha256``, printed by ``sled-verifier tokens new --device ID``).
    """

    model_config = ConfigDict(extra="allow")  # the extra keys are overrides, checked on merging

    group: str
    token_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    token_file: str | None = None
    token_sha256: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class Fleet(_Strict):
    version: int = FLEET_VERSION
    verifier: Verifier
    groups: dict[str, DeviceSettings] = Field(min_length=1)
    devices: dict[str, Device] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _supported(cls, version: int) -> int:
        if version != FLEET_VERSION:
            raise ValueError(f"version {version} is not supported (this is version {FLEET_VERSION})")
        return version

    @field_validator("devices")
    @classmethod
    def _devices_fit_their_groups(cls, devices: dict[str, Device], info: ValidationInfo) -> dict[str, Device]:
        """Every device names a group and its overrides make valid settings. A field validator (not
        a model one) so that it runs even when other sections have errors: all problems at once."""
        groups: dict[str, DeviceSettings] = info.data.get("groups") or {}
        problems = []
        for device_id, device in devices.items():
            if device.token_env is not None and device.token_file is not None:
                problems.append(f"devices.{device_id}: give 'token_env' or 'token_file', not both")
            if groups and device.group not in groups:
                problems.append(f"devices.{device_id}.group: unknown group '{device.group}' "
                                f"(groups: {', '.join(groups)})")
                continue
            if device.group not in groups:
                continue  # the groups section itself has errors
            try:
                _merge(groups[device.group], device.overrides, f"devices.{device_id}")
            except ValueError as e:
                problems.append(str(e))
        if problems:  # one line per problem, each "devices.<id>.<field>: message"
            raise ValueError("\n".join(problems))
        return devices


def _message(err: Any) -> str:
    return str(err["msg"]).removeprefix("Value error, ")


def _merge(base: DeviceSettings, overrides: dict[str, Any], where: str) -> DeviceSettings:
    """``base`` with ``overrides`` applied (nested tables merge key by key), validated."""
    data = base.model_dump()
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    try:
        return DeviceSettings.model_validate(data)
    except ValidationError as e:
        raise ValueError("\n".join(f"{where}.{'.'.join(str(p) for p in err['loc'])}: {_message(err)}"
                                   for err in e.errors())) from None


class EffectiveDevice(_Strict):
    """One device's settings, with its group and overrides applied."""

    device: str
    group: str
    verifier: Verifier
    settings: DeviceSettings
    token_env: str | None
    token_file: str | None

    def token(self) -> str | None:
        """The device's bearer token, read from its environment variable or file (None: none set)."""
        if self.token_env is not None:
            value = os.environ.get(self.token_env)
            if not value:
                raise FleetError(f"device '{self.device}': the environment variable {self.token_env} is not set")
            return value.strip()
        if self.token_file is not None:
            try:
                return Path(self.token_file).read_text(encoding="utf-8").strip()
            except OSError as e:
                raise FleetError(f"device '{self.device}': cannot read token_file {self.token_file}: {e.strerror}") from None
        return None


def effective(fleet: Fleet, device_id: str) -> EffectiveDevice:
    device = fleet.devices.get(device_id)
    if device is None:
        raise FleetError(f"unknown device '{device_id}' (devices: {', '.join(fleet.devices) or 'none'})")
    settings = _merge(fleet.groups[device.group], device.overrides, f"devices.{device_id}")
    return EffectiveDevice(device=device_id, group=device.group, verifier=fleet.verifier, settings=settings,
                           token_env=device.token_env, token_file=device.token_file)


def _lines(node: yaml.Node, path: tuple[str, ...] = (), out: dict | None = None) -> dict[tuple[str, ...], int]:
    """The 1-based line of every mapping key and sequence item in a composed YAML document."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            out[child] = key.start_mark.line + 1
            _lines(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _lines(item, (*path, str(i)), out)
    return out


def load(path: str | Path) -> Fleet:
    """Read and validate a fleet file; every problem is a ``FleetError`` naming file, line, field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FleetError(f"{path}: cannot read: {e.strerror}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise FleetError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict) or node is None:
        raise FleetError(f"{path}: a fleet file is a mapping with 'verifier', 'groups' and 'devices'")
    lines = _lines(node)
    try:
        return Fleet.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            entries = [(loc, _message(err))]
            if loc == ("devices",):  # the cross-field check names its own fields, one per line
                entries = [(tuple(f.split(".")), m) for f, _, m in (x.partition(": ") for x in _message(err).splitlines())]
            for field, msg in entries:
                line = next((lines[field[:n]] for n in range(len(field), -1, -1) if field[:n] in lines), 1)
                problems.append(f"{path}:{line}: {'.'.join(field) or 'fleet'}: {msg}")
        raise FleetError("\n".join(problems)) from None


def schema() -> dict[str, Any]:
    """The JSON Schema of a fleet file (for editors)."""
    return Fleet.model_json_schema()
