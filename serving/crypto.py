"""Encryption at rest: patient text is sealed with AES-GCM (the `cryptography` package) before it reaches the database.

Two levels of keys. The *data keys* (32 random bytes, base64) come from $ATTUNE_DATA_KEY or a key file, never from
the database; the first is current and wraps new session keys, later ones only unwrap until `attune data-key
rotate` rewraps their session keys. Each session has its own random *session key*, stored in the database wrapped
under a data key. A row's text is sealed under its session's key with associated data that binds it to its table,
session and row. Erasing a session deletes its wrapped key (crypto-shredding): its ciphertext, in any copy of the
database, can no longer be opened with any key the service holds.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from pathlib import Path
from typing import Mapping

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV_KEY, ENV_KEY_FILE = "ATTUNE_DATA_KEY", "ATTUNE_DATA_KEY_FILE"
KEY_FILE = "data_key"
KEY_BYTES, NONCE_BYTES = 32, 12
VERSION = b"\x01"
"""First byte of every sealed value and wrapped key: the format (AES-256-GCM, 12-byte random nonce, 16-byte tag)."""
MAKE_KEY_HINT = ("make one with `attune data-key new`, or: python -c \"import base64, os; "
                 "print(base64.b64encode(os.urandom(32)).decode())\"")
FILE_HEADER = ("# Attune data keys (base64, 32 bytes each). The first line wraps new session keys; later lines only\n"
               "# unwrap until `attune data-key rotate`. Keep a copy apart from the database backups: without\n"
               "# these keys the stored messages cannot be read, and a backup stored with them is not protected.\n")


class DataKeyError(RuntimeError):
    """A data key is missing, malformed or not the one the database was written with; the message says what to do."""


def key_id(key: bytes) -> str:
    """A data key's public name: 16 hex digits of a domain-separated SHA-256 (reveals nothing usable of the key)."""
    return hashlib.sha256(b"attune data key id\x00" + key).hexdigest()[:16]


def new_key_text() -> str:
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def parse_key(text: str, source: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise DataKeyError(f"{source} does not hold a base64-encoded {KEY_BYTES}-byte key; {MAKE_KEY_HINT}")
    return key


def key_texts(text: str) -> list[str]:
    """The base64 keys in `text`: separated by commas or lines, comments after '#' left out."""
    return [p.strip() for line in text.splitlines() for p in line.split("#", 1)[0].split(",") if p.strip()]


def _seal(aead: AESGCM, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return VERSION + nonce + aead.encrypt(nonce, plaintext, aad)


def _open(aead: AESGCM, sealed: bytes, aad: bytes) -> bytes:
    """Raises InvalidTag when the key, the associated data or the bytes are not the ones sealed."""
    sealed = bytes(sealed)
    if sealed[:1] != VERSION:
        raise InvalidTag()
    return aead.decrypt(sealed[1:1 + NONCE_BYTES], sealed[1 + NONCE_BYTES:], aad)


def _row_aad(purpose: str, session_id: str, row_id: str) -> bytes:
    return f"attune/{purpose}/v1|{session_id}|{row_id}".encode()


def _wrap_aad(session_id: str, data_key_id: str) -> bytes:
    return f"attune/session-key/v1|{session_id}|{data_key_id}".encode()


class SessionCipher:
    """One session's key: seals and opens the text of its rows. `purpose` names the table ("message",
    "feedback"), so a sealed value cannot be moved to another row, session or table."""

    __slots__ = ("session_id", "_aead")

    def __init__(self, session_id: str, key: bytes):
        self.session_id, self._aead = session_id, AESGCM(key)

    def seal(self, purpose: str, row_id: str, text: str) -> bytes:
        return _seal(self._aead, text.encode("utf-8"), _row_aad(purpose, self.session_id, row_id))

    def open(self, purpose: str, row_id: str, sealed: bytes) -> str:
        try:
            return _open(self._aead, sealed, _row_aad(purpose, self.session_id, row_id)).decode("utf-8")
        except InvalidTag:
            raise DataKeyError(f"{purpose} {row_id!r} of session {self.session_id!r} does not open with its session "
                               "key: the row was altered or moved from another session") from None


class KeyRing:
    """The data keys this process holds: `current_id` wraps new session keys; every key unwraps."""

    def __init__(self, keys: list[bytes], source: str):
        if not keys:
            raise DataKeyError(f"{source} holds no data key; {MAKE_KEY_HINT}")
        self.source = source
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self.ids: list[str] = list(dict.fromkeys(key_id(k) for k in keys))
        self.current_id = self.ids[0]

    @classmethod
    def from_text(cls, text: str, source: str) -> "KeyRing":
        """Keys separated by commas or lines (comments after '#'), the current one first."""
        return cls([parse_key(p, source) for p in key_texts(text)], source)

    @classmethod
    def ephemeral(cls) -> "KeyRing":
        """A random key that lives as long as the process: for in-memory databases, which do too."""
        return cls([secrets.token_bytes(KEY_BYTES)], "a throwaway in-memory key")

    def new_session_key(self, session_id: str) -> tuple[str, bytes, SessionCipher]:
        """(data key id, the wrapped key to store, its cipher) for a new session."""
        key = secrets.token_bytes(KEY_BYTES)
        return self.current_id, self.wrap(session_id, key), SessionCipher(session_id, key)

    def wrap(self, session_id: str, key: bytes) -> bytes:
        return _seal(self._keys[self.current_id], key, _wrap_aad(session_id, self.current_id))

    def _unwrap_bytes(self, session_id: str, data_key_id: str, wrapped: bytes) -> bytes:
        aead = self._keys.get(data_key_id)
        if aead is None:
            raise DataKeyError(f"session {session_id!r} has its key wrapped under data key {data_key_id}, which "
                               f"{self.source} does not hold (it holds {', '.join(self.ids)}); add that key back "
                               "as a later line or entry, or restore it from your key backup")
        try:
            return _open(aead, wrapped, _wrap_aad(session_id, data_key_id))
        except InvalidTag:
            raise DataKeyError(f"the wrapped key of session {session_id!r} does not open with data key "
                               f"{data_key_id}: the row was altered or moved from another session") from None

    def unwrap(self, session_id: str, data_key_id: str, wrapped: bytes) -> SessionCipher:
        return SessionCipher(session_id, self._unwrap_bytes(session_id, data_key_id, wrapped))

    def rewrap(self, session_id: str, data_key_id: str, wrapped: bytes) -> bytes:
        """The same session key wrapped under the current data key (the text it seals is not touched)."""
        return self.wrap(session_id, self._unwrap_bytes(session_id, data_key_id, wrapped))


# ------------------------------------------------------------ where the keys come from
def key_file_for(data_dir: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    env = os.environ if environ is None else environ
    if env.get(ENV_KEY_FILE):
        return Path(env[ENV_KEY_FILE]).expanduser()
    return None if data_dir is None else Path(data_dir) / KEY_FILE


def load_keyring(key_file: Path | None, environ: Mapping[str, str] | None = None, create: bool = True) -> KeyRing:
    """$ATTUNE_DATA_KEY if set, else $ATTUNE_DATA_KEY_FILE, else `key_file`, created (mode 0600) with a new key when
    missing and `create`: the one-machine default, like the API key files."""
    env = os.environ if environ is None else environ
    if env.get(ENV_KEY):
        return KeyRing.from_text(env[ENV_KEY], f"${ENV_KEY}")
    path = Path(env[ENV_KEY_FILE]).expanduser() if env.get(ENV_KEY_FILE) else key_file
    if path is None:
        raise DataKeyError(f"no data key: set ${ENV_KEY} (base64, 32 bytes; several comma-separated, current "
                           f"first) or ${ENV_KEY_FILE} (a file holding them, e.g. a mounted secret); {MAKE_KEY_HINT}")
    if not path.exists():
        if not create:
            raise DataKeyError(f"the data key file {path} does not exist; restore it from your key backup")
        write_key_file(path, [new_key_text()], exclusive=True)
    return KeyRing.from_text(path.read_text(encoding="utf-8"), f"the data key file {path}")


def write_key_file(path: Path, keys: list[str], exclusive: bool = False) -> None:
    """Write `keys` (current first) atomically with mode 0600. `exclusive`: leave a file that appeared meanwhile
    (another process created the key first; both then use that one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(FILE_HEADER + "".join(k + "\n" for k in keys))
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_keyring(url: str) -> KeyRing:
    """The keys a `Repository` opened without any uses: a throwaway key for an in-memory SQLite database; else
    $ATTUNE_DATA_KEY / $ATTUNE_DATA_KEY_FILE, else the file `data_key` beside a SQLite file, else
    $ATTUNE_HOME/serve/data_key (the serve default). The service passes the keys of its ServeConfig instead."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            return KeyRing.ephemeral()
        return load_keyring(Path(parsed.database).expanduser().parent / KEY_FILE)
    home = os.environ.get("ATTUNE_HOME")
    return load_keyring((Path(home) if home else Path.home() / ".cache" / "attune") / "serve" / KEY_FILE)


# ------------------------------------------------------------ the database's record of data key ids
DATA_KEYS = sa.table("data_keys", sa.column("id", sa.String), sa.column("created", sa.DateTime))
SESSION_KEYS = sa.table("session_keys", sa.column("session_id", sa.String), sa.column("data_key_id", sa.String),
                        sa.column("wrapped", sa.LargeBinary), sa.column("created", sa.DateTime))


def register(conn: sa.Connection, ring: KeyRing) -> None:
    """Refuse keys that are not the database's, then record the current key's id (never the key). Every data key
    id the database knows must be in `ring`: a wrong key, or an old key dropped before `attune data-key rotate`
    moved its session keys, is an error at start-up rather than unreadable sessions later."""
    from datetime import datetime, timezone

    known = set(conn.execute(sa.select(DATA_KEYS.c.id)).scalars())
    missing = sorted(known - set(ring.ids))
    if missing:
        raise DataKeyError(f"the database's session keys are wrapped under data key(s) {', '.join(missing)}, but "
                           f"{ring.source} holds {', '.join(ring.ids)}: this is not the key the database was written "
                           f"with. Set ${ENV_KEY} or ${ENV_KEY_FILE} to the right key (restore it from your key backup)"
                           "; keep an old key as a later entry until `attune data-key rotate` has moved its sessions")
    if ring.current_id not in known:
        conn.execute(sa.insert(DATA_KEYS).values(id=ring.current_id, created=datetime.now(timezone.utc)))
