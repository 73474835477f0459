"""The power-cut test's rig (tests/test_powercut.py): a lazy file system under PostgreSQL's
data directory and both chunk stores, workloads that journal what was acknowledged, and
the checks that turn journals into what each file may hold after a cut."""
