"""A Kiln function for the `custom.debian12` runtime, using only python3's
standard library.

FC's custom runtime contract: listen on 0.0.0.0:$FC_CUSTOM_LISTEN_PORT
(9000 by default) and answer `POST /invoke` with the result. The request id of the
call comes in the `x-fc-request-id` header.

Extra behaviour used by Kiln's tests, driven by the request body:
  {"sleep": 0.5}        answer after half a second
  {"fail": true}        answer a function error (status 404, x-fc-status: 404)
  {"crash": true}       exit the process mid-call
  {"write": "/tmp/x"}   write a file and report whether it worked
  {"alloc": 400}        touch 400 MB of memory (beyond the limit: the
                        instance is killed)
  {"log": 5, "every": 0.1}
                        print 5 log lines, 0.1 s apart, each carrying the
                        call's request id as FC's runtime loggers do
                        (`<time> <requestId> [INFO] ...`)
  {"hooks": true}       record this call in /tmp/hooks.log and answer the
                        log's lines: what the lifecycle hooks (POST /initialize,
                        GET /pre-stop) and such calls did, in order

FC's lifecycle hooks: POST /initialize and GET /pre-stop append a line to
/tmp/hooks.log (and print it); with FAIL_INITIALIZER=1 in the environment
/initialize answers 500, a failed initializer. INITIALIZER_SLEEP=S and
PRE_STOP_SLEEP=S make the hook take S seconds before answering (past its
timeout, a timed-out hook).
"""

import json
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOOKS_LOG = "/tmp/hooks.log"


def record(what, request_id):
    line = f"{what} {request_id} {time.time():.3f}"
    with open(HOOKS_LOG, "a") as f:
        f.write(line + "\n")
    print(line, flush=True)


def recorded():
    try:
        with open(HOOKS_LOG) as f:
            return [line.rstrip("\n") for line in f]
    except FileNotFoundError:
        return []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # keep stdout for the function's own logs
        pass

    def _answer(self, status, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path == "/initialize":
            record("initialize", self.headers.get("x-fc-request-id", ""))
            time.sleep(float(os.environ.get("INITIALIZER_SLEEP") or 0))
            if os.environ.get("FAIL_INITIALIZER") == "1":
                return self._answer(500, {"errorMessage": "initializer failed on demand"})
            return self._answer(200, {"initialized": True})
        if self.path != "/invoke":
            return self._answer(404, {"error": "unknown path " + self.path})
        request_id = self.headers.get("x-fc-request-id", "")
        print(f"handling {request_id}", flush=True)
        try:
            event = json.loads(raw) if raw.strip().startswith(b"{") else {}
        except ValueError:
            event = {}
        if event.get("hooks"):
            record("invoke", request_id)
            return self._answer(200, {"hooks": recorded()})
        if event.get("log"):
            for n in range(int(event["log"])):
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                print(f"{stamp} {request_id} [INFO] line {n} of {event['log']}", flush=True)
                time.sleep(float(event.get("every", 0)))
        if event.get("sleep"):
            time.sleep(float(event["sleep"]))
        if event.get("crash"):
            os._exit(3)
        if event.get("alloc"):
            blob = b"x" * (int(event["alloc"]) * 1024 * 1024)
            event["allocated"] = len(blob)
        if event.get("fail"):
            return self._answer(404, {"errorMessage": "failed on demand"}, {"x-fc-status": "404"})
        result = {
            "hello": "from kiln",
            "requestId": request_id,
            "functionName": self.headers.get("x-fc-function-name"),
            "memory": self.headers.get("x-fc-function-memory"),
            "echo": raw.decode("utf-8", "replace"),
            "env": os.environ.get("GREETING"),
            "hostname": socket.gethostname(),
        }
        if event.get("write"):
            try:
                with open(event["write"], "w") as f:
                    f.write("written")
                result["wrote"] = True
            except OSError as e:
                result["wrote"] = False
                result["writeError"] = str(e)
        return self._answer(200, result)

    def do_GET(self):
        if self.path == "/pre-stop":
            record("pre-stop", self.headers.get("x-fc-request-id", ""))
            time.sleep(float(os.environ.get("PRE_STOP_SLEEP") or 0))
            return self._answer(200, {"stopped": True})
        return self._answer(404, {"error": "unknown path " + self.path})


def main():
    port = int(os.environ.get("FC_CUSTOM_LISTEN_PORT") or os.environ.get("FC_SERVER_PORT") or "9000")
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    print(f"listening on {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
