"""The client side of login: argon2 key derivation, SCRAM-style proofs, verifiers, and
the rules for names and passwords.

The server decides (migration 7): it hands out the account's salt, KDF parameters and a
one-time nonce; the client derives SaltedKey = argon2(password, salt, parameters) and
proves it knows it with ClientProof = ClientKey XOR HMAC(StoredKey, message), where
ClientKey = HMAC(SaltedKey, "Client Key"), StoredKey = SHA-256(ClientKey) and the message
binds the name and the nonce. The server keeps StoredKey only (not enough to log in),
checks the proof, applies throttling and opens a session. Neither the password nor
anything equivalent to it reaches the server, its logs or pg_stat_activity: a proof is
good for one nonce only.

Throttling (on the server, so a client that skips this code gets no more guesses): the
first FREE_FAILURES consecutive failures cost nothing extra; from then on each failure
locks the account's logins for 2 ** (failures - FREE_FAILURES) seconds (1 s, 2 s, 4 s, …),
capped at MAX_DELAY_S. A successful login or a new password clears the count. Unknown
names answer and throttle exactly like accounts.

Names and passwords are never logged; log lines carry account ids only.
"""

import hashlib
import hmac
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass, field

import sqlalchemy as sa
from argon2 import Type
from argon2.low_level import hash_secret_raw
from sqlalchemy.engine import Engine

from dfsfs.errors import AuthError, InvalidArgumentError, PermissionDeniedError
from dfsfs.meta.db import run_transaction
from dfsfs.session import DEFAULT_EXPIRY_S, LoginResult

log = logging.getLogger(__name__)

# A user name: 1 to 32 characters, lower-case letters, digits, '_', '.', '-',
# starting with a letter or '_' (the portable subset of POSIX user names).
USER_NAME_PATTERN = re.compile(r"^[a-z_][a-z0-9_.-]*$")
USER_NAME_MAX = 32
PASSWORD_MAX_BYTES = 1024
FREE_FAILURES = 3  # the server's rule (dfsfs_login_delay); here for messages and tests
MAX_DELAY_S = 300  # an online guesser gets at most ~300 guesses a day per account
LOGIN_FAILED = "wrong user name or password"
SALT_BYTES = 16
KEY_BYTES = 32
_KDF_TYPES = {"argon2id": Type.ID, "argon2i": Type.I, "argon2d": Type.D}
# argon2-cffi's defaults (RFC 9106 low-memory profile), and cheap ones for tests only.
PROFILES = {
    "default": {"time_cost": 3, "memory_cost": 65536, "parallelism": 4},
    "test": {"time_cost": 1, "memory_cost": 8, "parallelism": 1},
}


class ThrottledError(AuthError):
    """Too many consecutive failed logins; the account accepts none for `retry_after` s."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed attempts, try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class KdfParameters:
    """How a password becomes a key: argon2 of which kind, salt and cost."""

    kdf: str
    salt: bytes
    time_cost: int
    memory_cost: int  # KiB
    parallelism: int
    key_length: int = KEY_BYTES


@dataclass(frozen=True)
class Verifier:
    """What the server keeps of a password: the KDF parameters and StoredKey."""

    parameters: KdfParameters
    stored_key: bytes = field(repr=False)

    def sql_parameters(self) -> dict:
        p = self.parameters
        return {"kdf": p.kdf, "salt": p.salt, "time_cost": p.time_cost,
                "memory_cost": p.memory_cost, "parallelism": p.parallelism,
                "key_length": p.key_length, "stored_key": self.stored_key}


VERIFIER_ARGUMENTS = (":kdf, :salt, :time_cost, :memory_cost, :parallelism, :key_length,"
                      " :stored_key")


# --- key derivation and proofs ------------------------------------------------------------


def kdf_profile() -> dict:
    """The argon2 cost of new verifiers: the library defaults, or cheap parameters when
    DFSFS_ARGON2_PROFILE=test (never use that for real accounts)."""
    return PROFILES.get(os.environ.get("DFSFS_ARGON2_PROFILE", "default"), PROFILES["default"])


def derive_key(password: str, parameters: KdfParameters) -> bytes:
    """SaltedKey: the raw argon2 output (as in an argon2 encoded hash)."""
    return hash_secret_raw(
        password.encode("utf-8"), parameters.salt, time_cost=parameters.time_cost,
        memory_cost=parameters.memory_cost, parallelism=parameters.parallelism,
        hash_len=parameters.key_length, type=_KDF_TYPES[parameters.kdf],
    )


def client_key(salted_key: bytes) -> bytes:
    return hmac.digest(salted_key, b"Client Key", "sha256")


def login_message(name: str, nonce: bytes) -> bytes:
    return b"dfsfs login v1:" + name.encode("utf-8") + b"\0" + nonce


def client_proof(salted_key: bytes, name: str, nonce: bytes) -> bytes:
    key = client_key(salted_key)
    signature = hmac.digest(hashlib.sha256(key).digest(), login_message(name, nonce), "sha256")
    return bytes(a ^ b for a, b in zip(key, signature, strict=True))


def make_verifier(password: str, profile: dict | None = None) -> Verifier:
    """A new verifier of `password` with a fresh salt (for `user add` and `user passwd`)."""
    validate_password(password)
    parameters = KdfParameters("argon2id", secrets.token_bytes(SALT_BYTES), **(profile or kdf_profile()))
    stored_key = hashlib.sha256(client_key(derive_key(password, parameters))).digest()
    return Verifier(parameters, stored_key)




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


def throttle_delay_s(failures: int) -> float:
    """Seconds an account stays locked after `failures` consecutive failed logins (the
    server's dfsfs_login_delay, for messages and tests)."""
    if failures < FREE_FAILURES:
        return 0
    return min(2 ** min(failures - FREE_FAILURES, 16), MAX_DELAY_S)


# --- login --------------------------------------------------------------------------------

_CHALLENGE = sa.text("SELECT * FROM dfsfs_login_challenge(:name)")
_LOGIN = sa.text(
    "SELECT * FROM dfsfs_login(:name, :nonce, :proof, :purpose, :host, :pid, :admin, :expiry_s)")


def login(engine_or_accounts, name: str, password: str, *, purpose: str = "command",
          admin: bool = False, expiry_s: int = DEFAULT_EXPIRY_S) -> LoginResult:
    """Log in on the server and open a session; raises AuthError (ThrottledError while the
    account is locked, PermissionDeniedError when `admin` is asked of a non-admin).

    `engine_or_accounts`: any engine of the database (the client role's, normally), or an
    AccountStore. `purpose` ('mount', 'command', 'admin') is shown by `dfsfs user sessions`;
    `admin` asks for a session that acts for every account (administrators only).
    """
    engine: Engine = getattr(engine_or_accounts, "engine", engine_or_accounts)
    challenge = run_transaction(engine, lambda conn: conn.execute(_CHALLENGE, {"name": name}).one())
    parameters = KdfParameters(challenge.kdf, bytes(challenge.salt), challenge.time_cost,
                               challenge.memory_cost, challenge.parallelism, challenge.key_length)
    nonce = bytes(challenge.nonce)
    proof = client_proof(derive_key(password, parameters), name, nonce)
    arguments = {"name": name, "nonce": nonce, "proof": proof, "purpose": purpose,
                 "host": socket.gethostname(), "pid": os.getpid(), "admin": admin,
                 "expiry_s": int(expiry_s)}
    row = run_transaction(engine, lambda conn: conn.execute(_LOGIN, arguments).one())
    if row.outcome == "throttled":
        log.info("login refused: throttled")
        raise ThrottledError(row.retry_after_s)
    if row.outcome == "not_admin":
        raise PermissionDeniedError(f"{name} is not a dfsfs administrator")
    if row.outcome != "ok":
        log.info("failed login")
        raise AuthError(LOGIN_FAILED)
    log.info("account id %d logged in (session %d)", row.account, row.session_id)
    return LoginResult(
        session_id=row.session_id, token=row.token, account=row.account, name=name,
        root_ino=row.root_ino, is_admin=row.is_admin, admin_session=admin,
        unix_user=row.unix_user, primary_store=row.primary_store, backup_store=row.backup_store,
        expires_at=row.expires_at, expiry_s=int(expiry_s),
    )
