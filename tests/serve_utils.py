"""A real ``endokern serve`` process on a free localhost port, for the server and TRL tests."""

import os
import re
import subprocess
import sys
import threading
import time

from limits import HANG_S
from model_utils import FIXTURE

LINE = re.compile(r"on http://127\.0\.0\.1:(\d+) ")


class Server:
    """``python -m endokern serve --model FIXTURE --port 0 ARGS``; ``url`` once it listens. Port 0: the system picks a
    free port and the server prints it, so parallel test runs never collide."""

    def __init__(self, *args, env=None, start_timeout=HANG_S):
        full_env = {k: v for k, v in os.environ.items() if k != "ENDOKERN_API_KEY"}
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "endokern", "serve", "--model", FIXTURE, "--host", "127.0.0.1", "--port", "0",
             *map(str, args)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=full_env,
        )
        self.log = []
        found = threading.Event()
        self.port = None

        def read():
            for line in self.proc.stderr:
                self.log.append(line)
                match = LINE.search(line)
                if match and self.port is None:
                    self.port = int(match.group(1))
                    found.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        deadline = time.monotonic() + start_timeout
        while not found.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start:\n" + "".join(self.log))
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self, timeout=HANG_S):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        return self.proc.returncode
