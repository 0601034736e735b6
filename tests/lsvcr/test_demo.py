"""The demo's console: its own lines on the console, everything else of the process in the log file."""

import os
import subprocess
import sys

from lsvcr.demo import console_and_log


def test_console_and_log_splits_the_output(tmp_path, capfd):
    log = tmp_path / "run" / "demo.log"
    print("before")
    with console_and_log(log) as console:
        print("python print")
        os.write(2, b"stderr at the fd level\n")
        subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
        console.write("a step line\n")
    print("after")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["before", "a step line", "after"] and err == ""
    assert log.read_text().splitlines() == ["python print", "stderr at the fd level", "child process"]
