"""Passwords (argon2id), login, and per-account throttling of failed logins.

Login throttling: the first FREE_FAILURES consecutive failures of an account cost
nothing extra; from then on each failure locks the account's logins for
2 ** (failures - FREE_FAILURES) seconds (1 s, 2 s, 4 s, …), capped at MAX_DELAY_S.
A successful login or a new password clears the count. The state lives in the
database, so it holds across processes and machines.

Names and passwords are never logged; log lines carry user ids only.
"""

import functools
import logging
import math
import os
import re
import secrets
from datetime import datetime, timezone

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from dfsfs.errors import AuthError, InvalidArgumentError
from dfsfs.meta.accounts import AccountStore, User

log = logging.getLogger(__name__)

# A user name: 1 to 32 characters, lower-case letters, digits, '_', '.', '-',
# starting with a letter or '_' (the portable subset of POSIX user names).
USER_NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_.-]*$")
USER_NAME_MAX = 32
PASSWORD_MAX_BYTES = 1024
FREE_FAILURES = 3
MAX_DELAY_S = 300  # an online guesser gets at most ~300 guesses a day per account
LOGIN_FAILED = "wrong user name or password"


class ThrottledError(AuthError):
    """Too many consecutive failed logins; the account accepts none for `retry_after` s."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed attempts, try again in {retry_after} s")
        self.retry_after = retry_after


def utcnow() -> datetime:
    """The clock of login throttling (tests replace it)."""
    return datetime.now(timezone.utc)


# --- hashing ------------------------------------------------------------------------------


def password_hasher() -> PasswordHasher:
    """argon2id with the library defaults (RFC 9106 low-memory profile), or cheap
    parameters when DFSFS_ARGON2_PROFILE=test (never use that for real accounts)."""
    return _hasher(os.environ.get("DFSFS_ARGON2_PROFILE", "default"))


@functools.cache
def _hasher(profile: str) -> PasswordHasher:
    if profile == "test":
        return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.ID)
    return PasswordHasher(type=Type.ID)


@functools.cache
def _dummy_hash(hasher: PasswordHasher) -> str:
    # Verified when the name is unknown, so that costs what a wrong password costs.
    return hasher.hash(secrets.token_hex(16))


def hash_password(password: str) -> str:
    validate_password(password)
    return password_hasher().hash(password)


def _verify(hasher: PasswordHasher, password_hash: str, password: str) -> bool:
    try:
        return hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


# --- validation ---------------------------------------------------------------------------


def validate_user_name(name: str) -> str:
    """Return `name` if it is a valid user name, else raise with the reason."""
    if not name:
        raise InvalidArgumentError("user name must not be empty")
    if len(name) > USER_NAME_MAX:
        raise InvalidArgumentError(
            f"user name is {len(name)} characters long; at most {USER_NAME_MAX} are allowed"
        )
    if not USER_NAME_PATTERN.match(name):
        raise InvalidArgumentError(
            "user name may contain only lower-case letters a-z, digits, '_', '.' and '-', "
            "and must start with a letter or '_'"
        )
    return name


def validate_password(password: str) -> str:
    if not password:
        raise InvalidArgumentError("password must not be empty")
    if len(password.encode("utf-8")) > PASSWORD_MAX_BYTES:
        raise InvalidArgumentError(f"password is longer than {PASSWORD_MAX_BYTES} bytes")
    return password


# --- login --------------------------------------------------------------------------------


def throttle_delay_s(failures: int) -> float:
    """Seconds an account stays locked after `failures` consecutive failed logins."""
    if failures < FREE_FAILURES:
        return 0
    return min(2 ** min(failures - FREE_FAILURES, 16), MAX_DELAY_S)


def login(accounts: AccountStore, name: str, password: str) -> User:
    """The account if `password` is right; raises AuthError (ThrottledError while locked).

    The attempt is counted as a failure before the password is checked (a success then
    resets the count), so parallel guesses cannot all get in before the lock is set.
    """
    hasher = password_hasher()
    user = accounts.get_user(name)
    locked_s = accounts.claim_login_attempt(user.id if user else None, utcnow(), throttle_delay_s)
    if locked_s > 0:
        log.info("login refused for user id %d: throttled", user.id)
        raise ThrottledError(math.ceil(locked_s))
    if user is None or not _verify(hasher, user.password_hash, password):
        if user is None:
            _verify(hasher, _dummy_hash(hasher), password)
        else:
            log.info("failed login for user id %d", user.id)
        raise AuthError(LOGIN_FAILED)
    if hasher.check_needs_rehash(user.password_hash):
        accounts.set_password_hash(user.id, hasher.hash(password))
        log.info("rehashed the password of user id %d with current parameters", user.id)
    accounts.record_successful_login(user.id)
    log.info("user id %d logged in", user.id)
    return accounts.get_user_by_id(user.id)
