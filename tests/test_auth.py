"""Passwords, login, throttling, name rules, and per-user scoping of account rows."""

import logging
import statistics
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from argon2 import PasswordHasher, Type

from dfsfs import auth
from dfsfs.auth import (
    LOGIN_FAILED,
    ThrottledError,
    hash_password,
    login,
    throttle_delay_s,
    validate_password,
    validate_user_name,
)
from dfsfs.errors import AuthError, InvalidArgumentError
from dfsfs.meta.accounts import AccountStore
from dfsfs.meta.db import create_engine

PASSWORD = "correct horse battery staple"


@pytest.fixture
def accounts(admin_engine) -> AccountStore:
    return AccountStore(admin_engine)


@pytest.fixture
def clock(monkeypatch):
    """A login clock that moves only when told to."""

    class Clock:
        now = datetime(2030, 1, 1, tzinfo=timezone.utc)

        def advance(self, seconds: float) -> None:
            self.now += timedelta(seconds=seconds)

    fake = Clock()
    monkeypatch.setattr(auth, "utcnow", lambda: fake.now)
    return fake


def new_name() -> str:
    return "u" + uuid.uuid4().hex[:12]


def add_user(accounts: AccountStore, password: str = PASSWORD, hasher=None) -> str:
    name = new_name()
    password_hash = (hasher or auth.password_hasher()).hash(password)
    accounts.create_user(name, password_hash)
    return name


def test_hashes_are_argon2id_with_test_parameters():
    encoded = hash_password(PASSWORD)
    assert encoded.startswith("$argon2id$")
    assert "m=8,t=1,p=1" in encoded
    assert hash_password(PASSWORD) != encoded  # salted


def test_login_returns_the_account(accounts):
    name = add_user(accounts)
    user = login(accounts, name, PASSWORD)
    assert user.name == name and user.failed_logins == 0 and user.root_ino is not None


def test_wrong_password_and_unknown_user_fail_alike(accounts, clock):
    name = add_user(accounts)
    with pytest.raises(AuthError) as wrong:
        login(accounts, name, "not the password")
    with pytest.raises(AuthError) as unknown:
        login(accounts, new_name(), PASSWORD)
    assert type(wrong.value) is type(unknown.value) is AuthError
    assert str(wrong.value) == str(unknown.value) == LOGIN_FAILED


def test_throttle_schedule():
    assert [throttle_delay_s(n) for n in range(1, 8)] == [0, 0, 1, 2, 4, 8, 16]
    assert throttle_delay_s(12) == auth.MAX_DELAY_S
    assert throttle_delay_s(10**6) == auth.MAX_DELAY_S


def test_failed_logins_are_throttled_with_a_growing_delay(accounts, clock):
    name = add_user(accounts)
    for _ in range(auth.FREE_FAILURES):
        with pytest.raises(AuthError, match=LOGIN_FAILED):
            login(accounts, name, "wrong")
    # Locked now: even the right password is refused without being checked.
    with pytest.raises(ThrottledError, match="too many failed attempts, try again in 1 s"):
        login(accounts, name, PASSWORD)
    assert accounts.get_user(name).failed_logins == auth.FREE_FAILURES

    clock.advance(1)
    with pytest.raises(AuthError, match=LOGIN_FAILED):
        login(accounts, name, "wrong again")
    clock.advance(1.5)
    with pytest.raises(ThrottledError) as throttled:
        login(accounts, name, PASSWORD)
    assert throttled.value.retry_after == 1  # 2 s lock, 1.5 s of it gone, rounded up

    clock.advance(0.5)
    assert login(accounts, name, PASSWORD).failed_logins == 0
    assert accounts.get_user(name).throttled_until is None


def test_new_password_ends_throttling(accounts, clock):
    name = add_user(accounts)
    for _ in range(auth.FREE_FAILURES):
        with pytest.raises(AuthError):
            login(accounts, name, "wrong")
    user = accounts.get_user(name)
    accounts.set_password_hash(user.id, hash_password("a new one"))
    assert login(accounts, name, "a new one").id == user.id


def test_login_rehashes_outdated_parameters(accounts):
    old = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1, type=Type.ID)
    name = add_user(accounts, hasher=old)
    before = accounts.get_user(name).password_hash
    login(accounts, name, PASSWORD)
    after = accounts.get_user(name).password_hash
    assert after != before and not auth.password_hasher().check_needs_rehash(after)
    login(accounts, name, PASSWORD)  # the new hash verifies
    assert accounts.get_user(name).password_hash == after


def test_unknown_user_costs_the_same_time_as_a_wrong_password(accounts, monkeypatch):
    # Costly enough that hashing, not the database, dominates (as in production).
    costly = PasswordHasher(time_cost=2, memory_cost=16 * 1024, parallelism=1, type=Type.ID)
    monkeypatch.setattr(auth, "password_hasher", lambda: costly)
    name = add_user(accounts, hasher=costly)
    user_id = accounts.get_user(name).id

    def seconds_to_fail(login_name: str) -> float:
        accounts.record_successful_login(user_id)  # keep throttling out of the measurement
        start = time.perf_counter()
        with pytest.raises(AuthError, match=LOGIN_FAILED):
            login(accounts, login_name, "wrong")
        return time.perf_counter() - start

    seconds_to_fail(new_name())  # warm up the dummy hash
    wrong = statistics.median(seconds_to_fail(name) for _ in range(5))
    unknown = statistics.median(seconds_to_fail(new_name()) for _ in range(5))
    assert 0.6 < unknown / wrong < 1.6, (wrong, unknown)


@pytest.mark.parametrize("name", ["alice", "_svc", "a.b-c_9", "x" * 32, "z"])
def test_valid_user_names(name):
    assert validate_user_name(name) == name


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must not be empty"),
        ("x" * 33, "33 characters long; at most 32"),
        ("Alice", "only lower-case letters"),
        ("9lives", "must start with a letter or '_'"),
        ("-rf", "must start with a letter or '_'"),
        ("a b", "only lower-case letters"),
        ("a/b", "only lower-case letters"),
        ("zoë", "only lower-case letters"),
    ],
)
def test_invalid_user_names(name, message):
    with pytest.raises(InvalidArgumentError, match=message):
        validate_user_name(name)


def test_password_rules():
    assert validate_password("x" * 1024) == "x" * 1024
    with pytest.raises(InvalidArgumentError, match="must not be empty"):
        hash_password("")
    with pytest.raises(InvalidArgumentError, match="longer than 1024 bytes"):
        validate_password("é" * 513)  # 1026 bytes in UTF-8


def test_names_and_passwords_are_never_logged(accounts, clock, caplog):
    caplog.set_level(logging.DEBUG)
    name = add_user(accounts)
    login(accounts, name, PASSWORD)
    for _ in range(auth.FREE_FAILURES + 1):
        with pytest.raises(AuthError):
            login(accounts, name, f"bad-{PASSWORD}")
    with pytest.raises(AuthError):
        login(accounts, "nobody-" + name, PASSWORD)
    assert caplog.records, "login should log (user ids only)"
    assert name not in caplog.text and PASSWORD not in caplog.text


def test_one_users_connection_cannot_reach_another_users_rows(database_url, accounts):
    alice = accounts.get_user(add_user(accounts))
    bob = accounts.get_user(add_user(accounts))
    engine = create_engine(database_url, user_id=alice.id)
    try:
        with engine.connect() as conn:
            role = conn.exec_driver_sql(
                "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"
            ).scalar()
            assert role is False, "the test role must not bypass row-level security"
            owners = set(conn.exec_driver_sql("SELECT user_id FROM inodes").scalars())
            visible_usage = set(conn.exec_driver_sql("SELECT user_id FROM usage").scalars())
            bob_root = conn.execute(
                sa.text("SELECT count(*) FROM inodes WHERE id = :ino"), {"ino": bob.root_ino}
            ).scalar()
        assert owners == visible_usage == {alice.id}
        assert bob_root == 0
        # The account functions, on this user's engine, see only this user's rows too.
        scoped = AccountStore(engine)
        assert scoped.footprint(bob.id).inodes == 0
        assert scoped.footprint(alice.id).inodes == 1
    finally:
        engine.dispose()
