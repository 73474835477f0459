"""Settings: precedence, validation, URL redaction, and the embedded database default."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from dfsfs import config
from dfsfs.cli import main
from dfsfs.config import (
    GiB,
    KiB,
    MiB,
    Settings,
    database_url_for,
    load_settings,
    parse_size,
    redact_url,
)
from dfsfs.embedded import PostgresServer
from dfsfs.errors import ConfigError


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    # The machine's /etc/dfsfs/config.toml must not leak into these tests.
    monkeypatch.setattr(config, "SYSTEM_CONFIG_FILE", tmp_path / "no-system-config.toml")
    return tmp_path


def load(data_dir: Path, flags=None, **environ) -> Settings:
    return load_settings(flags or {}, environ={"DFSFS_DATA_DIR": str(data_dir), **environ})


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults(data_dir):
    settings = load(data_dir)
    assert settings.database_url is None
    assert settings.data_dir == data_dir
    assert settings.store_url == f"file://{data_dir}/chunks"
    assert settings.backup_url == f"file://{data_dir}/backup"
    assert (settings.backup_mode, settings.chunk_size) == ("sync", None)  # None: as recorded
    assert settings.write_buffer_bytes == 64 * MiB
    assert settings.read_cache_bytes == 128 * MiB
    assert (settings.readahead_chunks, settings.attr_timeout_s) == (4, 1.0)
    assert settings.config_file is None


def test_default_data_dir_follows_xdg_for_non_root(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert config.default_data_dir({"XDG_DATA_HOME": str(tmp_path)}) == tmp_path / "dfsfs"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert config.default_data_dir({}) == Path("/var/lib/dfsfs")


def test_flags_beat_environment_beat_file_beat_defaults(data_dir):
    write_config(data_dir / "config.toml", 'chunk_size = "64K"\nreadahead_chunks = 9\n')
    env = {"DFSFS_CHUNK_SIZE": "128K", "DFSFS_READAHEAD": "7"}
    flags = {"chunk_size": "256K", "readahead_chunks": None}  # None = flag not given

    assert load(data_dir, flags, **env).chunk_size == 256 * KiB
    assert load(data_dir, flags, **env).readahead_chunks == 7
    assert load(data_dir, **env).chunk_size == 128 * KiB
    assert load(data_dir).chunk_size == 64 * KiB
    assert load(data_dir).readahead_chunks == 9
    (data_dir / "config.toml").unlink()
    assert load(data_dir).chunk_size is None  # the database's recorded size


def test_config_file_named_by_environment_or_flag(data_dir):
    chosen = write_config(data_dir / "other.toml", 'backup_mode = "async"\n')
    assert load(data_dir, DFSFS_CONFIG=str(chosen)).backup_mode == "async"
    assert load(data_dir, {"config_file": str(chosen)}).config_file == chosen
    with pytest.raises(ConfigError, match="does not exist"):
        load(data_dir, {"config_file": str(data_dir / "missing.toml")})


def test_data_dir_from_config_file_moves_default_stores(data_dir):
    chosen = write_config(data_dir / "my.toml", f'data_dir = "{data_dir}/elsewhere"\n')
    settings = load_settings({}, environ={"DFSFS_CONFIG": str(chosen)})
    assert settings.store_url == f"file://{data_dir}/elsewhere/chunks"


def test_environment_names(data_dir):
    settings = load(
        data_dir,
        DFSFS_DATABASE_URL="postgresql://u:pw@db.example:5433/meta",
        DFSFS_STORE="s3://bucket/prefix?endpoint=http://localhost:8333",
        DFSFS_BACKUP="/srv/backup",
        DFSFS_BACKUP_MODE="ASYNC",
        DFSFS_WRITE_BUFFER="64M",
        DFSFS_READ_CACHE="1G",
        DFSFS_LOG_LEVEL="debug",
    )
    assert settings.database_url == "postgresql+psycopg2://u:pw@db.example:5433/meta"
    assert settings.store_url == "s3://bucket/prefix?endpoint=http://localhost:8333"
    assert settings.backup_url == "file:///srv/backup"
    assert (settings.backup_mode, settings.log_level) == ("async", "DEBUG")
    assert (settings.write_buffer_bytes, settings.read_cache_bytes) == (64 * MiB, GiB)


def test_empty_environment_variable_counts_as_unset(data_dir):
    assert load(data_dir, DFSFS_DATABASE_URL="").database_url is None


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64K", 64 * KiB), ("1m", MiB), ("4MiB", 4 * MiB), ("2 GiB", 2 * GiB),
     ("1.5G", 3 * GiB // 2), ("1KB", 1000), ("3MB", 3_000_000), (512, 512)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-4096", "chunk size must not be negative"),
        ("3000", "chunk size must be a power of two"),
        ("0", "chunk size must be a power of two"),
        ("1MB", "chunk size must be a power of two"),
        ("1K", "chunk size must be between 4 KiB and 64 MiB"),
        ("128M", "chunk size must be between 4 KiB and 64 MiB"),
        ("lots", "chunk size must be a number of bytes"),
        ("0.5K", "chunk size must be between 4 KiB"),
        ("1.0001K", "chunk size must be a whole number of bytes"),
    ],
)
def test_bad_chunk_sizes(data_dir, value, message):
    with pytest.raises(ConfigError, match=message):
        load(data_dir, {"chunk_size": value})


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"database_url": "mysql://u:hunter2@h/db"}, "unknown scheme: use postgresql://"),
        ({"database_url": "localhost"}, "unknown scheme"),
        ({"store_url": "ftp://host/dir"}, "must be a file:// URL, an s3:// URL or an absolute"),
        ({"store_url": "relative/dir"}, "must be a file:// URL"),
        ({"backup_url": "file://relative"}, "must name an absolute path"),
        ({"store_url": "s3:///prefix"}, "names no bucket"),
        ({"backup_url": "/same", "store_url": "file:///same"}, "backup store must differ"),
        ({"backup_mode": "later"}, "backup mode must be one of sync, async"),
        ({"readahead_chunks": "-1"}, "readahead .* non-negative whole number"),
        ({"attr_timeout_s": "soon"}, "attribute timeout must be a number of seconds"),
        ({"log_level": "chatty"}, "log level must be one of DEBUG"),
        ({"write_buffer_bytes": "16K", "chunk_size": "1M"}, r"write buffer \(16 KiB\) must hold at least one chunk"),
        ({"data_dir": "relative"}, "data directory must be an absolute path"),
        ({"no_such_setting": 1}, "unknown setting"),
    ],
)
def test_bad_values_have_clear_messages(data_dir, flags, message):
    with pytest.raises(ConfigError, match=message) as raised:
        load(data_dir, flags)
    assert "hunter2" not in str(raised.value)


def test_config_file_unknown_keys_and_bad_toml(data_dir):
    write_config(data_dir / "config.toml", 'chunk_sise = "1M"\n')
    with pytest.raises(ConfigError, match="unknown key\\(s\\): chunk_sise; known keys: "):
        load(data_dir)
    write_config(data_dir / "config.toml", "chunk_size = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load(data_dir)


def test_redact_url_hides_passwords_and_secret_parameters():
    assert redact_url("postgresql+psycopg2://u:p@ss:w@host:5432/db") == (
        "postgresql+psycopg2://u:***@host:5432/db"
    )
    shown = redact_url("s3://b/p?endpoint=http://h:8333&access_key=AK&secret_key=SK&region=x")
    assert "AK" not in shown and "SK" not in shown
    assert "endpoint=http://h:8333" in shown and "region=x" in shown
    assert redact_url("postgresql://db?password=pw&host=/run") == (
        "postgresql://db?password=***&host=/run"
    )
    assert redact_url("file:///var/lib/dfsfs/chunks") == "file:///var/lib/dfsfs/chunks"
    assert redact_url(None) == "(embedded)"


def test_settings_repr_hides_passwords(data_dir):
    settings = load(data_dir, DFSFS_DATABASE_URL="postgresql://u:hunter2@h/db")
    assert "hunter2" not in repr(settings)


def test_cli_reports_bad_settings_as_errors(data_dir):
    result = CliRunner().invoke(main, ["--data-dir", str(data_dir), "--chunk-size", "3000", "init"])
    assert result.exit_code == 1
    assert result.stderr == "dfsfs: error: chunk size must be a power of two, not '3000'\n"


def test_unreachable_database_is_a_config_error(data_dir):
    settings = load(data_dir, DFSFS_DATABASE_URL="postgresql://u:hunter2@127.0.0.1:1/db")
    with pytest.raises(ConfigError, match="cannot reach the metadata database") as raised:
        database_url_for(settings)
    assert "hunter2" not in str(raised.value)


def test_embedded_server_is_started_once_then_reused():
    # A short path the postgres user can reach (pytest's tmp_path under /root is not).
    base = Path(tempfile.mkdtemp(prefix="dfsfs-emb-", dir="/tmp"))
    os.chmod(base, 0o755)
    server = PostgresServer(base / "postgres")
    try:
        settings = load_settings({"data_dir": str(base)}, environ={})
        url = database_url_for(settings)
        pid = (server.cluster_dir / "postmaster.pid").read_text().split()[0]
        assert database_url_for(settings) == url
        assert (server.cluster_dir / "postmaster.pid").read_text().split()[0] == pid
        assert url.startswith("postgresql+psycopg2://dfsfs@/dfsfs?host=")
    finally:
        server.stop(mode="immediate")
        shutil.rmtree(base, ignore_errors=True)
