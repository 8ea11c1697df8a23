"""A local HTTP server over a shard folder, for tests of remote shards (a thread in the test process).

    with ShardServer(folder) as server:          # server.url = "http://127.0.0.1:<port>"
        server.requests                         # paths asked for, in order
        server.flaky = {"shard-000001.tar": 1}  # cut the stream halfway through the first request of that file
"""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        server = self.server
        name = self.path.split("?", 1)[0].lstrip("/")
        with server.lock:
            server.requests.append(name)
            cut = server.flaky.get(name, 0) > 0
            if cut:
                server.flaky[name] -= 1
        if not cut:
            return super().do_GET()
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])  # then drop the connection: the client sees a short body
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # quiet
        pass


class ShardServer:
    def __init__(self, folder: str | Path):
        handler = functools.partial(_Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.requests, self.httpd.flaky, self.httpd.lock = [], {}, threading.Lock()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests

    @property
    def flaky(self) -> dict[str, int]:
        return self.httpd.flaky

    def __enter__(self) -> "ShardServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
