"""A local HTTP server over a shard folder, for tests of remote shards (a thread in the test process).

    with ShardServer(folder) as server:          # server.url = "http://127.0.0.1:<port>"
        server.requests                         # paths asked for, in order
        server.flaky = {"shard-000001.tar": 1}  # cut the stream halfway through the first request of that file
    PUT stores the upload under the folder (what curl -T sends: chunked or with a Content-Length).
"""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # answers curl's "Expect: 100-continue" on uploads at once (1.0: curl waits 1 s)

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

    def do_PUT(self):  # noqa: N802 - an upload (curl -T): stored under the folder, chunked or with a length
        if "chunked" in self.headers.get("Transfer-Encoding", ""):
            data = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                data += self.rfile.read(size)
                self.rfile.readline()  # the CRLF after each chunk
            self.rfile.readline()  # the CRLF after the last (empty) chunk
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        name = self.path.split("?", 1)[0].lstrip("/")
        with self.server.lock:
            self.server.requests.append(f"PUT {name}")
        path = Path(self.directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)  # an object store has no folders to create first
        path.write_bytes(data)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

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
