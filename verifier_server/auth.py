"""Who is calling: per-device bearer tokens, stored as hashes only, and the per-device limits.

A device presents ``Authorization: Bearer <token>``. The verifier holds only ``sha256:<hex>`` of
each token, from the fleet file (``devices.<id>.token_sha256``: the same file serves both sides) or
a tokens file (``<device> sha256:<hex>`` per line). Tokens are 256 random bits, so a fast hash is
enough (nothing to brute-force) and a stolen credentials file cannot be replayed. Every stored
hash is compared in constant time, and all of them are compared, so the time of a check says
nothing about which device (or whether any) matched.

``--auth none`` turns this off for a lab: every caller is an anonymous device keyed by its address
(``anonymous@<address>``), so that each client of a lab has its own session and rate limits
rather than all of them sharing one device's (behind a proxy every caller has the proxy's address:
give devices tokens there).
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.fleet import DeviceLimits, Fleet

ANONYMOUS = "anonymous"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CredentialsError(ValueError):
    """A tokens file or fleet file cannot be used as credentials; the message says where and why."""


def new_token() -> str:
    """A fresh device token: 256 random bits, URL-safe, recognisable by its prefix."""
    return "sled_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Credentials:
    """The devices allowed in, by the hash of their token; ``None`` hashes: authentication off."""

    hashes: dict[str, str] | None

    @property
    def enabled(self) -> bool:
        return self.hashes is not None

    @property
    def devices(self) -> list[str]:
        return list(self.hashes or [])

    def identify(self, authorization: str | None, address: str | None = None) -> str | None:
        """The device whose token the header carries, or None (no header, a bad scheme, no match);
        without authentication, the anonymous device of the caller's ``address``."""
        if self.hashes is None:
            return f"{ANONYMOUS}@{address}" if address else ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        presented = hash_token(token.strip()).encode()
        found = None
        for device, stored in self.hashes.items():  # no early exit: the time does not depend on the match
            if hmac.compare_digest(presented, stored.encode()):
                found = device
        return found

    @classmethod
    def none(cls) -> Credentials:
        return cls(None)

    @classmethod
    def from_fleet(cls, fleet: Fleet, source: str) -> Credentials:
        hashes = {d: dev.token_sha256 for d, dev in fleet.devices.items() if dev.token_sha256}
        if not hashes:
            raise CredentialsError(f"{source}: no device has a 'token_sha256' (sled-verifier tokens new --device ID)")
        return cls(hashes)

    @classmethod
    def from_tokens_file(cls, path: str | Path) -> Credentials:
        """Read ``<device> sha256:<hex>`` lines (``#`` starts a comment); errors name file and line."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise CredentialsError(f"{path}: cannot read: {e.strerror}") from None
        hashes: dict[str, str] = {}
        for n, line in enumerate(lines, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) != 2 or not DEVICE_ID.match(fields[0]) or not _HASH.match(fields[1]):
                raise CredentialsError(f"{path}:{n}: expected '<device-id> sha256:<64 hex digits>'")
            if fields[0] in hashes:
                raise CredentialsError(f"{path}:{n}: device '{fields[0]}' is listed twice")
            hashes[fields[0]] = fields[1]
        if not hashes:
            raise CredentialsError(f"{path}: no device tokens (sled-verifier tokens new --device ID)")
        return cls(hashes)


def metrics_label(device: str) -> str:
    """The device as a metrics label: anonymous callers share one, so that the labels stay as
    few as the fleet's devices whatever the addresses that call."""
    return ANONYMOUS if device.startswith(ANONYMOUS) else device


class TokenBucket:
    """``rate`` events per second on average, bursts of up to ``burst``; the clock is injectable."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.level = burst
        self.stamp = clock()

    def take(self) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there will be."""
        now = self.clock()
        self.level = min(self.burst, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) / self.rate


@dataclass
class RoundLimiter:
    """Each device's verify rounds per second (a token bucket per device, made on first use)."""

    limits: DeviceLimits
    clock: Callable[[], float] = time.monotonic
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    def take(self, device: str) -> float:
        """0.0 when ``device`` may run a round now, else the seconds to wait (for Retry-After)."""
        if self.limits.rounds_per_s <= 0:
            return 0.0
        bucket = self.buckets.get(device)
        if bucket is None:
            bucket = self.buckets[device] = TokenBucket(self.limits.rounds_per_s, self.limits.burst, self.clock)
        return bucket.take()
