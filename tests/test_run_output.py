"""What a newcomer reads while a run goes: a client hanging up on the toy web is no traceback, and
progress with a total not known yet says so instead of "1000/0 samples"."""
from __future__ import annotations

import logging
from http.server import BaseHTTPRequestHandler

from pipeline.parallel import Progress
from pipeline.toyweb.server import QuietServer


def test_a_client_hanging_up_is_quiet_and_a_real_error_is_not(capsys):
    server = QuietServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    try:
        for error in (ConnectionResetError(104, "Connection reset by peer"), BrokenPipeError(32, "Broken pipe"),
                      ValueError("a bug in the handler")):
            try:
                raise error
            except Exception:   # as socketserver calls it: inside the except clause
                server.handle_error(None, ("127.0.0.1", 40000))
    finally:
        server.server_close()
    err = capsys.readouterr().err
    assert "ConnectionResetError" not in err and "BrokenPipeError" not in err
    assert "ValueError: a bug in the handler" in err


def test_progress_without_a_known_total(caplog):
    with caplog.at_level(logging.INFO, logger="vlp"):
        Progress("download/plan", 4, None).update(1, 1000, force=True)
        Progress("download", 4, 4000).update(1, 1000, force=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("download/plan: 1/4 shards, 1000 samples,"), lines
    assert lines[1].startswith("download: 1/4 shards, 1000/4000 samples,"), lines
