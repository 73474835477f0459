"""dfsfs: a mountable file system of SHA-256-checked chunks with a backup copy,
whose metadata lives in PostgreSQL."""

__version__ = "0.1.0"
