"""The Optuna study database (``tune.storage``): the one reader of it, shared by ``segevo tune`` and its report.

A bad URL, an unreachable server, a file that is not a database, or a missing study is one line naming the URL
(password hidden); a read-only use (``tune --report``) never creates a database that is not there.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from segevo.errors import UserError


def storage_name(url: str) -> str:
    """The URL with its password hidden, for messages."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: str) -> str | None:
    """The database file of a ``sqlite:///`` storage URL (None for other databases, memory, or a bad URL)."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return parsed.database


def open_storage(tune, create: bool = True) -> Any:
    """The study's RDB storage with heartbeats; a bad or unreachable URL is a one-line error naming it. With
    ``create=False`` (a read-only command) a SQLite file that does not exist is an error, not a new database."""
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    try:
        url = make_url(tune.storage)
    except sqlalchemy.exc.ArgumentError:
        raise UserError(f"tune.storage {tune.storage!r} is not a database URL (sqlite:///optuna.db, "
                         "postgresql://user:password@host:5432/db)") from None
    name = storage_name(tune.storage)
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = sqlite_file(tune.storage)
        if database and Path(database).is_dir():
            raise UserError(f"tune.storage {name}: {database} is a directory, not a study database")
        if database and not create and not Path(database).is_file():
            raise UserError(f"tune.storage {name}: no study database at {database} (run 'segevo tune' first)")
        if database:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = {"connect_args": {"timeout": 60}}  # several processes write: wait for the lock, do not fail
    elif backend in ("postgresql", "mysql"):
        engine = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
        if url.drivername == "postgresql":  # the driver we install, whatever SQLAlchemy's default for the scheme
            url = url.set(drivername="postgresql+psycopg")
    else:
        raise UserError(f"tune.storage {name}: unsupported database {backend!r} (use sqlite or postgresql)")
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=tune.retries,
                                                             inherit_intermediate_values=True)
    attempts = 0
    while True:
        try:
            return optuna.storages.RDBStorage(url.render_as_string(hide_password=False), engine_kwargs=engine,
                                              heartbeat_interval=tune.heartbeat_s, grace_period=tune.grace_s,
                                              heartbeat_stale_trial_callback=retry)
        except ImportError as err:
            raise UserError(f"tune.storage {name}: no database driver ({err})") from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            reason = str(getattr(err, "orig", err) or err).strip().splitlines()[0]
            attempts += 1
            # Two processes creating the schema at once collide; a dead server does not get better by waiting.
            if attempts == 5 or any(w in reason.lower() for w in ("connect", "authentication", "not a database")):
                raise UserError(f"tune.storage {name}: cannot open the study database: {reason}") from None
            time.sleep(attempts)


def load_study(name: str, storage: Any) -> Any:
    """An existing study, or a one-line error naming it and the database."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"no study {name!r} in {storage_name(storage.url)} (run 'segevo tune' first)") from None
