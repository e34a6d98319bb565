"""Which API keys exist and which tenant each belongs to.

Two sources: ``BATCHD_API_KEYS`` (each key is its own tenant, named by a hash of the key, so
the key itself is never stored) and a keys file (``--keys-file``), one
``<key> <tenant-name> [weight=W] [priority] [admin]`` per line, where several keys may name
the same tenant. The weight is the tenant's share of batch capacity against other tenants (default 1;
see store/fair_share.py); lines of one tenant must not give it different weights.
``priority`` lets the tenant use the ``priority`` service tier on realtime requests (see
inference/service_tiers.py); tenants of ``BATCHD_API_KEYS``, and everyone on a server without
keys, may use it, as nothing says otherwise for them. ``admin`` is a role of the key itself
(not of its tenant): the console shows such a key the engines and every tenant's batches.
Only keys-file keys can be admins; on a server without keys, everyone is. The file is
re-read on SIGHUP; a file that no longer parses keeps the previous keys in force rather than
locking everyone out.

Lookups compare the presented key with every known key in constant time and never stop
early, so the time taken says nothing about which key (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PUBLIC_TENANT = "public"
TENANT_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MIN_KEY_LENGTH = 8


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the line (never the key)."""


def hashed_tenant(key: str) -> str:
    return "k_" + hashlib.sha256(key.encode()).hexdigest()[:24]


def named_tenant(name: str) -> str:
    # A prefix of its own, so a file tenant can never collide with a hashed one.
    return "t_" + name


@dataclass(frozen=True)
class _Entry:
    key: bytes
    tenant: str
    weight: float | None = None  # None: the default share
    priority: bool = False  # may use the priority service tier
    admin: bool = False  # the console's operator views (engines, every tenant's batches)


def _parse_weight(field: str, where: str) -> float:
    name, _, value = field.partition("=")
    try:
        weight = float(value) if name == "weight" else float("nan")
    except ValueError:
        weight = float("nan")
    if not 0 < weight <= 1_000_000:  # NaN fails this too
        raise KeysFileError(f"{where}: expected 'weight=W' with W a number above 0")
    return weight


def parse_keys_file(path: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    seen: dict[bytes, int] = {}
    weighed: dict[str, tuple[float, int]] = {}  # tenant name: (weight, line it was given on)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc}") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        options = parts[2:]
        flags = {flag for flag in ("priority", "admin") if flag in options}
        options = [option for option in options if option not in flags]
        if len(parts) < 2 or len(options) > 1:
            raise KeysFileError(
                f"{path}:{line_no}: expected '<key> <tenant-name> [weight=W] [priority] [admin]'"
            )
        key, name = parts[:2]
        weight = _parse_weight(options[0], f"{path}:{line_no}") if options else None
        if len(key) < MIN_KEY_LENGTH:
            raise KeysFileError(f"{path}:{line_no}: key shorter than {MIN_KEY_LENGTH} characters")
        if not TENANT_NAME_RE.fullmatch(name):
            raise KeysFileError(
                f"{path}:{line_no}: tenant name must be 1-64 characters from [A-Za-z0-9_.-]"
            )
        raw = key.encode()
        if raw in seen:
            raise KeysFileError(f"{path}:{line_no}: key already given on line {seen[raw]}")
        seen[raw] = line_no
        if weight is not None:
            earlier = weighed.setdefault(name, (weight, line_no))
            if earlier[0] != weight:
                raise KeysFileError(
                    f"{path}:{line_no}: tenant {name} was given weight {earlier[0]:g} on line"
                    f" {earlier[1]}"
                )
        entries.append(
            _Entry(raw, named_tenant(name), weight, "priority" in flags, "admin" in flags)
        )
    return entries


class KeyRing:
    def __init__(self, env_keys: list[str], keys_file: Path | None = None) -> None:
        self._env = [_Entry(k.encode(), hashed_tenant(k)) for k in env_keys]
        self._file = keys_file
        self._lock = threading.Lock()
        self._entries = self._env + (parse_keys_file(keys_file) if keys_file else [])

    @property
    def enabled(self) -> bool:
        return bool(self._entries) or self._file is not None

    def __len__(self) -> int:
        return len(self._entries)

    def reload(self) -> bool:
        """Re-read the keys file. On a bad file, log why and keep the keys in force."""
        if self._file is None:
            return False
        try:
            entries = self._env + parse_keys_file(self._file)
        except KeysFileError as exc:
            log.error("keys file not reloaded, previous keys stay in force: %s", exc)
            return False
        with self._lock:
            self._entries = entries
        log.info("keys file reloaded: %d keys", len(entries))
        return True

    def priority_allowed(self, tenant: str) -> bool:
        """Whether ``tenant`` may use the priority service tier: a keys-file tenant only if a
        line of its says ``priority``; any other tenant, yes."""
        if not tenant.startswith(named_tenant("")):
            return True  # an environment key's tenant, or the public one
        with self._lock:
            return any(e.priority for e in self._entries if e.tenant == tenant)

    def weights(self) -> dict[str, float]:
        """The tenants the keys file gives a weight (the others weigh the default)."""
        with self._lock:
            return {e.tenant: e.weight for e in self._entries if e.weight is not None}

    def is_admin(self, presented: str | None) -> bool:
        """Whether ``presented`` is an admin key (everyone is, on a server without keys).
        Constant time in the key's content, like ``tenant_for``."""
        if not self.enabled:
            return True
        candidate = (presented or "").encode()
        admin = False
        for entry in self._entries:  # no early exit, by design
            if hmac.compare_digest(candidate, entry.key) and entry.admin:
                admin = True
        return admin

    def tenant_for(self, presented: str) -> str | None:
        """The tenant owning ``presented``, or None. Constant time in the key's content."""
        candidate = presented.encode()
        found: str | None = None
        for entry in self._entries:  # no early exit, by design
            if hmac.compare_digest(candidate, entry.key):
                found = entry.tenant
        return found
