"""`attune data-key`: the keys that encrypt stored patient text (serving/crypto.py), for operators. `status` shows them
by id, `new` adds a current key, `rotate` moves every session key under it and drops the old keys. Key ids only are
printed, except by `new` when the keys live in $ATTUNE_DATA_KEY, where the operator must paste the new one."""
from __future__ import annotations

import os
import sys
from typing import Callable

RESTART = "restart the service (every replica) so that it wraps new session keys under it"


class _Failed(Exception):
    pass


def _open(config: str | None, data_dir: str | None):
    """(ServeConfig, KeyRing, Repository) as the service would open them; the Repository checks the keys."""
    from serving.config import CONFIG_ENV, ConfigError, ServeConfig
    from serving.crypto import DataKeyError, load_keyring
    from serving.db import Repository

    env = dict(os.environ)
    if config:
        env[CONFIG_ENV] = config
    if data_dir:
        env["ATTUNE_DATA_DIR"] = data_dir
    try:
        cfg = ServeConfig.from_env(env)
        ring = load_keyring(cfg.data_key_file, create=False)
        return cfg, ring, Repository(cfg.database_url, keys=ring)
    except (ConfigError, DataKeyError) as e:
        raise _Failed(str(e)) from None


def _from_env() -> bool:
    from serving.crypto import ENV_KEY

    return bool(os.environ.get(ENV_KEY))


def _run(body: Callable[[], int]) -> int:
    try:
        return body()
    except _Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def status(config: str | None = None, data_dir: str | None = None) -> int:
    """Show the data keys (by id) that encrypt stored text and how many session keys each one wraps."""
    def body() -> int:
        cfg, ring, repo = _open(config, data_dir)
        try:
            usage = repo.data_key_usage()
        finally:
            repo.close()
        print(f"data keys from {ring.source} (database {cfg.database_url.split('@')[-1]}):")
        for kid in ring.ids:
            role = "current" if kid == ring.current_id else "old"
            print(f"  {kid}  {role:<7}  wraps {usage.get(kid, 0)} session keys")
        if len(ring.ids) > 1:
            print("old keys still held: `attune data-key rotate` moves their session keys to the current one")
        return 0
    return _run(body)


def new(config: str | None = None, data_dir: str | None = None) -> int:
    """Add a new current data key (the old ones stay, to read until `rotate`); then restart and rotate."""
    from serving.crypto import ENV_KEY, KeyRing, key_texts, new_key_text, write_key_file

    def body() -> int:
        cfg, ring, repo = _open(config, data_dir)
        repo.close()
        key = new_key_text()
        kid = KeyRing.from_text(key, "the new key").current_id
        if _from_env():
            print(f"new data key {kid}; set {ENV_KEY} to it followed by the old ones, then {RESTART}, then run "
                  f"`attune data-key rotate`:\n{ENV_KEY}={','.join([key, *key_texts(os.environ[ENV_KEY])])}")
            return 0
        path = cfg.data_key_file
        write_key_file(path, [key, *key_texts(path.read_text(encoding="utf-8"))])
        print(f"new current data key {kid} added to {path} (old keys kept: {', '.join(ring.ids)}); {RESTART}, "
              "then run `attune data-key rotate`")
        return 0
    return _run(body)


def rotate(config: str | None = None, data_dir: str | None = None) -> int:
    """Rewrap every session key under the current data key, then drop the old keys from the database and key file."""
    from serving.crypto import ENV_KEY, key_texts, write_key_file

    def body() -> int:
        cfg, ring, repo = _open(config, data_dir)
        try:
            moved = repo.rewrap_session_keys()
            usage = repo.data_key_usage()
        finally:
            repo.close()
        still = {k: n for k, n in usage.items() if k != ring.current_id and n}
        print(f"rewrapped {moved} session keys under data key {ring.current_id}")
        if still:
            raise _Failed(f"session keys are still wrapped under {still}: a replica started before "
                          f"`attune data-key new` is still running; {RESTART}, then run rotate again")
        old = ring.ids[1:]
        if not old:
            print("no old data key was held; to replace the current one, run `attune data-key new` first")
        elif _from_env():
            current = key_texts(os.environ[ENV_KEY])[0]
            print(f"old keys {', '.join(old)} no longer wrap anything; set {ENV_KEY} to the current key alone and "
                  f"restart:\n{ENV_KEY}={current}")
        else:
            path = cfg.data_key_file
            write_key_file(path, key_texts(path.read_text(encoding="utf-8"))[:1])
            print(f"old keys {', '.join(old)} removed from {path} and the database. Backups made before this "
                  "rotation need them: keep a copy with those backups as long as they are kept, or destroy it to "
                  "make them unreadable. Restart the service so no process keeps them in memory")
        return 0
    return _run(body)


def commands(arg) -> dict:
    """The `attune data-key` entries of attune.cli.COMMANDS (`arg` is attune.cli.arg)."""
    where = [arg("--config", help="ServeConfig YAML of the service (default: $ATTUNE_SERVE_CONFIG or the defaults; "
                 "the database is its database_url, the keys $ATTUNE_DATA_KEY or its data_key_file)"),
             arg("--data-dir", help="the service's data folder (default: $ATTUNE_HOME/serve)")]
    return {("data-key", "status"): (status, where), ("data-key", "new"): (new, where),
            ("data-key", "rotate"): (rotate, where)}
