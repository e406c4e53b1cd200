"""The `duplus` command line: listing commands answer without a model, and a closed pipe is not an error."""

from __future__ import annotations

import subprocess
import sys

from duplus.cli import main


def test_list_classes_prints_the_taxonomy(capsys):
    assert main(["list-classes"]) == 0
    out = capsys.readouterr().out
    assert "liver tumor" in out and "head and neck" in out


def test_a_reader_that_stops_early_gets_no_traceback():
    """`duplus list-classes | head -1`: the pipe closes before the listing is written."""
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(0.5); from duplus.cli import main; "
                              "sys.exit(main(['list-classes']))"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # the reader has gone before the first line
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
