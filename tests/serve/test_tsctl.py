"""tsctl's pure parts: where a server's workers put their Unix sockets."""

from __future__ import annotations

from pathlib import Path

from tsctl import SOCKET_NAME_ROOM, UNIX_PATH_MAX, server_tmp


def test_server_tmp_stays_in_the_workdir_unless_a_socket_path_would_be_too_long(tmp_path: Path) -> None:
    assert server_tmp(tmp_path) == tmp_path / "tmp"
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    short = server_tmp(deep)
    assert short.parent == Path("/tmp") and short.name.startswith("servekit-") and short.is_dir()
    assert len(str(short)) + SOCKET_NAME_ROOM <= UNIX_PATH_MAX
    assert (short.stat().st_mode & 0o777) == 0o700
    assert server_tmp(deep) == short  # the same folder for the same server
    short.rmdir()
