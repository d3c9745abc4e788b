"""A local HTTP server that answers like Hugging Face's `resolve` endpoint: size and hash in the headers (sha256
in `X-Linked-ETag` for LFS files, after a redirect to a CDN path; the git blob sha1 in `ETag` for small
files), Range requests, and a connection that can be made to break. Tests point the pack's downloader at it."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import threading

LFS = (".bin", ".safetensors", ".pth", ".pt")  # stored with git LFS on Hugging Face: sha256 in X-Linked-ETag


class Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    break_after: dict = {}  # path -> bytes to send before cutting the connection (once)
    requests: list = []
    stated_size: dict = {}  # path -> a size to state in the headers instead of the true one
    offline = False  # True: every connection is dropped before an answer, as a network that is down
    served_instead: dict = {}  # path -> bytes sent on GET in place of the file its headers describe

    def log_message(self, *a):
        pass

    def _meta(self, path):
        data = self.files[path]
        if path.endswith(LFS):
            return {"X-Linked-Size": str(len(data)), "X-Linked-ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        blob = hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()
        return {"ETag": f'"{blob}"', "Content-Length": str(self.stated_size.get(path, len(data)))}

    def _dropped(self) -> bool:
        if self.offline:
            self.close_connection = True
            self.connection.shutdown(2)
        return self.offline

    def do_HEAD(self):
        if self._dropped():
            return
        path = self.path.split("?")[0]
        if path not in self.files:
            self.send_error(404)
            return
        if path.endswith(LFS):  # large files redirect to a CDN, headers on the redirect
            self.send_response(302)
            self.send_header("Location", "/cdn" + path)
        else:
            self.send_response(200)
        for k, v in self._meta(path).items():
            self.send_header(k, v)
        self.end_headers()

    def do_GET(self):
        if self._dropped():
            return
        path = self.path.split("?")[0]
        self.requests.append((path, self.headers.get("Range")))
        if path.endswith(LFS) and not path.startswith("/cdn"):
            self.send_response(302)
            self.send_header("Location", "/cdn" + path)
            self.end_headers()
            return
        path = path.removeprefix("/cdn")
        if path not in self.files:
            self.send_error(404)
            return
        data = self.served_instead.get(path, self.files[path])
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = self.break_after.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)



@contextlib.contextmanager
def serve(files: dict):
    """Serve `files` ({"/path": bytes}) on 127.0.0.1; yields the base URL. `Handler.files` may be changed
    while it runs (a file added, removed or replaced)."""
    Handler.files = dict(files)
    Handler.break_after, Handler.requests, Handler.stated_size, Handler.served_instead = {}, [], {}, {}
    Handler.offline = False
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
