"""A login session as a daemon or a command holds it: what the login returned, the
engine that presents it, the heartbeat that keeps it alive, and its end.

The server derives the account of every statement from the session token the connection
presents (migration 7). A session ends when its holder logs out, when an administrator
revokes it (`dfsfs user sessions NAME --revoke`), or when `expiry_s` pass without a
heartbeat (the daemon was killed, the machine is gone). Every statement under an ended
session fails with SessionEndedError; the daemon then unmounts.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
import trio
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from dfsfs.errors import DfsfsError
from dfsfs.meta.db import (
    SessionEndedError,
    create_engine,
    run_transaction,
    session_ended_event,
)

log = logging.getLogger(__name__)

__all__ = ["LoginResult", "SessionEndedError", "heartbeat", "logout", "keep_alive",
           "session_engine", "DEFAULT_HEARTBEAT_S", "DEFAULT_EXPIRY_S"]

DEFAULT_HEARTBEAT_S = 60.0
DEFAULT_EXPIRY_S = 300
POLL_S = 0.5  # how often the heartbeat task looks whether a statement found the session ended


@dataclass(frozen=True)
class LoginResult:
    """What a successful login returns (dfsfs_login in migration 7)."""

    session_id: int
    token: str = field(repr=False)  # the secret the connections present; never logged
    account: int
    name: str
    root_ino: int
    is_admin: bool
    admin_session: bool  # acts for every account (administration)
    unix_user: str | None
    primary_store: str | None = field(repr=False)  # the account's own stores (may hold keys)
    backup_store: str | None = field(repr=False)
    expires_at: datetime | None = None
    expiry_s: int = DEFAULT_EXPIRY_S


def session_engine(url: str, login: LoginResult, **options) -> Engine:
    """An engine (of the client role's `url`) whose connections act under `login`'s session."""
    return create_engine(url, session_token=login.token, **options)


def heartbeat(engine: Engine) -> datetime:
    """Extend the session of `engine` by its expiry; return the new expiry time.
    Raises SessionEndedError once it has ended."""
    return run_transaction(
        engine, lambda conn: conn.execute(sa.text("SELECT dfsfs_heartbeat()")).scalar_one())


def logout(engine: Engine, reason: str = "logout") -> None:
    """End the session of `engine` ('unmounted' for a daemon, 'logout' for a command).
    A session that has ended already stays as it is; one that cannot be ended now (the
    database is down) expires by itself."""
    try:
        run_transaction(engine, lambda conn: conn.execute(
            sa.text("SELECT dfsfs_logout(:reason)"), {"reason": reason}))
    except SessionEndedError:
        pass
    except (DfsfsError, DBAPIError) as error:
        log.warning("could not end the login session (it expires by itself): %s",
                    str(error).strip().splitlines()[0])


async def keep_alive(engine: Engine, interval_s: float, on_ended: Callable[[str], None]) -> None:
    """Heartbeat every `interval_s` until the session ends, then call `on_ended(reason)`
    and return. It ends when a heartbeat is refused, or at once when any statement of
    `engine` found the session ended. A heartbeat that fails for another reason (the
    database is down) is retried at the next interval: the session expires only if the
    outage outlasts its expiry."""
    ended = session_ended_event(engine) or threading.Event()
    waited = interval_s
    while True:
        if ended.is_set():
            on_ended("a statement found the session ended (revoked or expired)")
            return
        if waited >= interval_s:
            waited = 0.0
            try:
                # Abandoned at unmount if the database does not answer: a heartbeat only
                # extends the expiry, so whether it lands or not changes nothing.
                await trio.to_thread.run_sync(heartbeat, engine, abandon_on_cancel=True)
            except SessionEndedError as error:
                on_ended(str(error))
                return
            except Exception as error:  # noqa: BLE001 - logged; the next beat retries
                log.warning("session heartbeat failed (retrying in %.0f s): %s", interval_s, error)
        await trio.sleep(POLL_S)
        waited += POLL_S
