"""Encryption of stored credentials (and of tenants' signing secrets), keyed from ``SECRET_KEY``.

The key is derived (HKDF, per purpose) rather than used as is. Callbacks are signed with each
tenant's own secret (``service/signing.py``), never with a key derived from ``SECRET_KEY``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from syncsvc.errors import SyncSvcError


def _derive(secret_key: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"syncsvc", info=purpose).derive(
        secret_key.encode()
    )


class SecretBox:
    """Encrypts with ``secret_key``; decrypts with it or, during a key rotation, with
    ``previous`` (``SYNCSVC_SECRET_KEY_PREVIOUS``) until ``syncsvc rotate-keys`` re-encrypted
    everything at rest."""

    def __init__(self, secret_key: str, previous: str | None = None) -> None:
        keys = [secret_key, *([previous] if previous else [])]
        self._fernet = MultiFernet(
            [Fernet(base64.urlsafe_b64encode(_derive(k, b"credentials"))) for k in keys]
        )

    def encrypt(self, data: Mapping[str, Any]) -> bytes:
        return self._fernet.encrypt(json.dumps(dict(data), sort_keys=True).encode())

    def decrypt(self, token: bytes) -> dict[str, Any]:
        try:
            value = json.loads(self._fernet.decrypt(token))
        except InvalidToken as exc:
            raise SyncSvcError(_UNREADABLE) from exc
        assert isinstance(value, dict)
        return value

    def rotate(self, token: bytes) -> bytes:
        """The same secret, encrypted with the current key."""
        try:
            return self._fernet.rotate(token)
        except InvalidToken as exc:
            raise SyncSvcError(_UNREADABLE) from exc


_UNREADABLE = "stored credentials cannot be decrypted with this SECRET_KEY (or SECRET_KEY_PREVIOUS)"


def hash_token(token: str) -> str:
    """API keys and feed tokens are stored as SHA-256: high-entropy, so no salt is needed."""
    return hashlib.sha256(token.encode()).hexdigest()
