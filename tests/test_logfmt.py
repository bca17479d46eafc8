"""gpuctld's and the agent's log lines (runtime.logfmt): JSON objects one a line with the ids
they were logged with, plain text for people, and the journal's priority prefix under
systemd, decided by the real stream's device and inode."""

from __future__ import annotations

import json
import logging
import os

from gpuctl.runtime.logfmt import JsonLines, formatter, to_journal


def record(message: str, *args, level: int = logging.INFO, exc_info=None, **extra):
    r = logging.LogRecord("gpuctl.runtime.controller", level, __file__, 1, message, args, exc_info)
    for key, value in extra.items():
        setattr(r, key, value)
    return r


def test_a_json_line_has_the_message_its_ids_and_a_traceback_in_one_field():
    line = JsonLines().format(record("job %d placed: %s", 7, "train-1", job_id=7))
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "job 7 placed: train-1"
    assert out["job_id"] == 7
    assert out["level"] == "info" and out["logger"] == "gpuctl.runtime.controller"
    assert out["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        line = JsonLines().format(record("failed", level=logging.ERROR, exc_info=sys.exc_info()))
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "error" and "ValueError: boom" in out["traceback"]


def test_auto_is_json_off_a_terminal_and_plain_asked_for_is_plain(tmp_path):
    with open(tmp_path / "log", "w") as stream:
        assert isinstance(formatter("auto", stream, {}), JsonLines)
        plain = formatter("plain", stream, {})
        assert plain.format(record("node %s lost", "a")).endswith(
            "INFO gpuctl.runtime.controller: node a lost"
        )


def test_lines_to_the_journal_carry_their_priority_on_every_line(tmp_path):
    with open(tmp_path / "journal", "w") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert to_journal(stream, env)
        assert not to_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not to_journal(stream, {"JOURNAL_STREAM": "garbage"})
        json_line = formatter("json", stream, env).format(record("x", level=logging.WARNING))
        assert json_line.startswith("<4>{") and json.loads(json_line[3:])["message"] == "x"
        try:
            raise KeyError("k")
        except KeyError:
            import sys

            text = formatter("plain", stream, env).format(
                record("bad", level=logging.ERROR, exc_info=sys.exc_info())
            )
        lines = text.split("\n")
        assert len(lines) > 2 and all(x.startswith("<3>") for x in lines)
