"""Kiln's Python runtime bootstrap: FC's event handler model on FC's
custom-runtime HTTP contract.

The agent starts this file as the instance's process (the `python3.11`
built-in runtime). It listens on FC_CUSTOM_LISTEN_PORT and answers:

  POST /invoke      calls the function's handler `handler(event, context)`
  any method/path   with `x-fc-control-path: /http-invoke` (an HTTP
                    trigger's call): the handler gets FC 3.0's HTTP trigger
                    event (JSON) and may answer in its response shape
                    (FC's `index.handler`: module `index` from /code,
                    function `handler`); the event is the request body as
                    bytes; the return value is the answer's body
  POST /initialize  calls the initializer `initialize(context)`, once
  GET  /pre-stop    calls the PreStop hook `pre_stop(context)`

with the x-fc-* headers the agent sends (request id, function metadata,
temporary credentials, region). An exception the function does not catch
is answered with FC's error body (errorMessage, errorType, stackTrace) and
`x-fc-status: 404`, FC's custom-runtime mark of a function error: the agent
reports it as a function error and the gateway answers with
`x-fc-error-type: UnhandledInvocationError`.

Every invocation's `FC Invoke Start/End RequestId` lines are written by the
agent for all runtimes; this bootstrap writes the initializer's and the
PreStop hook's (`FC Initialize Start RequestId: ...`).

HTTP triggers: today an HTTP trigger's call arrives here as any other
invocation (the body as the event). FC 3.0's HTTP-trigger event JSON and
its statusCode/headers/body/isBase64Encoded answer belong in `invoke`
below, keyed on the marker header the trigger path will send.
"""

import base64
import importlib
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CODE_DIR = os.environ.get("FC_FUNC_CODE_PATH", "/code")
# FC's Python search path: the code, its python/ folder, then the layers'.
SEARCH_PATH = [CODE_DIR, os.path.join(CODE_DIR, "python"), "/opt/python"]

_local = threading.local()
# The initializer and its timeout as /initialize named them: the agent
# sends them on that call only, FC's context carries them on every call.
_initializer = ["", "0"]


def _request_id():
    return getattr(_local, "request_id", "")


class _RequestIdFilter(logging.Filter):
    def filter(self, record):
        record.request_id = _request_id()
        return True


class _FcFormatter(logging.Formatter):
    """FC's log line: `2024-01-02T03:04:05.678Z <request id> [INFO] msg`."""

    def formatTime(self, record, datefmt=None):
        t = time.gmtime(record.created)
        return time.strftime("%Y-%m-%dT%H:%M:%S", t) + ".%03dZ" % record.msecs


def _setup_logging():
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        _FcFormatter("%(asctime)s %(request_id)s [%(levelname)s] %(message)s")
    )
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    return root


LOGGER = _setup_logging()


class Credentials:
    def __init__(self, access_key_id, access_key_secret, security_token):
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.security_token = security_token


class FunctionMeta:
    def __init__(self, name, handler, memory, timeout, initializer, initialization_timeout):
        self.name = name
        self.handler = handler
        self.memory = memory
        self.timeout = timeout
        self.initializer = initializer
        self.initialization_timeout = initialization_timeout


class ServiceMeta:
    """FC 2.0's service, kept for handlers written against it."""

    def __init__(self, name, qualifier, version_id):
        self.name = name
        self.log_project = ""
        self.log_store = ""
        self.qualifier = qualifier
        self.version_id = version_id


class FCContext:
    def __init__(self, headers):
        h = lambda k, d="": headers.get(k, d) or d  # noqa: E731
        self.request_id = h("x-fc-request-id")
        self.credentials = Credentials(
            h("x-fc-access-key-id"), h("x-fc-access-key-secret"), h("x-fc-security-token")
        )
        self.function = FunctionMeta(
            h("x-fc-function-name", os.environ.get("FC_FUNCTION_NAME", "")),
            h("x-fc-function-handler", os.environ.get("FC_FUNCTION_HANDLER", "")),
            _int(h("x-fc-function-memory", os.environ.get("FC_FUNCTION_MEMORY_SIZE", "0"))),
            _int(h("x-fc-function-timeout", "0")),
            h("x-fc-function-initializer", _initializer[0]),
            _int(h("x-fc-initialization-timeout", _initializer[1])),
        )
        qualifier = h("x-fc-qualifier", "LATEST")
        self.service = ServiceMeta("", qualifier, "" if qualifier == "LATEST" else qualifier)
        self.region = h("x-fc-region", os.environ.get("FC_REGION", ""))
        self.account_id = h("x-fc-account-id", os.environ.get("FC_ACCOUNT_ID", ""))
        self.instance_id = os.environ.get("FC_INSTANCE_ID", "")
        self.logger = LOGGER


def _int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


class HandlerError(Exception):
    """A handler string that names no callable: FC-shaped, never the
    bootstrap's own traceback."""

    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type


def parse_handler(handler):
    """`index.handler` -> ("index", "handler"); `src/app.main` ->
    ("src.app", "main")."""
    module, dot, function = handler.rpartition(".")
    if not dot or not module or not function:
        raise HandlerError(
            "InvalidHandler",
            "Invalid handler %r: give it as module.function (e.g. index.handler)" % handler,
        )
    return module.replace("/", "."), function


_loaded = {}
_load_lock = threading.Lock()


def load(handler):
    """The callable `handler` names, imported once per instance (warm calls
    reuse it; a failed import is tried again on the next call)."""
    with _load_lock:
        fn = _loaded.get(handler)
        if fn is not None:
            return fn
        module_name, function = parse_handler(handler)
        for p in reversed(SEARCH_PATH):
            if p not in sys.path:
                sys.path.insert(0, p)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.split(".")[0] == e.name.split(".")[0]:
                raise HandlerError(
                    "ImportModuleError",
                    "Unable to import module %r for handler %r: no %s.py in %s"
                    % (module_name, handler, module_name.replace(".", "/"), CODE_DIR),
                ) from None
            raise
        fn = getattr(module, function, None)
        if not callable(fn):
            raise HandlerError(
                "HandlerNotFound",
                "Handler %r is missing on module %r: define def %s(...) in %s.py"
                % (function, module_name, function, module_name.replace(".", "/")),
            )
        _loaded[handler] = fn
        return fn


def error_body(exc):
    """FC's error shape. The stack trace leaves out the bootstrap's frames."""
    if isinstance(exc, HandlerError):
        return {"errorMessage": str(exc), "errorType": exc.error_type}
    frames = traceback.extract_tb(exc.__traceback__)
    frames = [f for f in frames if f.filename != __file__]
    return {
        "errorMessage": str(exc),
        "errorType": type(exc).__name__,
        "stackTrace": traceback.format_list(frames),
    }


def encode_result(value):
    """The handler's return value as the answer's body: bytes as they are,
    str as UTF-8, None as nothing, anything else as JSON."""
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    return json.dumps(value).encode("utf-8")


# The agent's mark of an HTTP trigger's call (FC's custom-runtime header):
# the request is the caller's own, method, path and all.
HTTP_INVOKE = "/http-invoke"


def http_event(method, path, headers, body, context):
    """FC 3.0's HTTP trigger event for a handler: the request as JSON. FC's
    own x-fc-* headers (credentials among them) are not part of it."""
    raw_path, _, query = path.partition("?")
    try:
        text, b64 = body.decode("utf-8"), False
    except UnicodeDecodeError:
        text, b64 = base64.b64encode(body).decode("ascii"), True
    domain = headers.get("x-forwarded-host") or headers.get("host", "")
    now = time.time()
    return {
        "version": "v1",
        "rawPath": raw_path,
        "body": text,
        "isBase64Encoded": b64,
        "headers": {k: v for k, v in headers.items() if not k.startswith("x-fc-")},
        "queryParameters": dict(urllib.parse.parse_qsl(query, keep_blank_values=True)),
        "requestContext": {
            "accountId": context.account_id,
            "domainName": domain,
            "domainPrefix": domain.split(".", 1)[0],
            "http": {
                "method": method,
                "path": raw_path,
                "protocol": "HTTP/1.1",
                "sourceIp": headers.get("x-forwarded-for", "").split(",")[0].strip(),
                "userAgent": headers.get("user-agent", ""),
            },
            "requestId": context.request_id,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "timeEpoch": str(int(now * 1000)),
        },
    }


def http_response(value):
    """The handler's answer to an HTTP trigger: FC 3.0's response shape
    (statusCode, headers, body, isBase64Encoded) as the HTTP answer, as a
    dict or a JSON string of one; anything else is a 200 with the value as
    its body."""
    shaped = value
    if isinstance(value, (str, bytes)):
        try:
            shaped = json.loads(value)
        except ValueError:
            shaped = None
    if isinstance(shaped, dict) and "statusCode" in shaped:
        status = int(shaped.get("statusCode") or 200)
        headers = {str(k): str(v) for k, v in (shaped.get("headers") or {}).items()}
        body = shaped.get("body")
        if shaped.get("isBase64Encoded") and isinstance(body, str):
            body = base64.b64decode(body)
        return status, headers, encode_result(body)
    return 200, {}, encode_result(value)


_initialized = False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kiln-python-runtime"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002
        pass  # the agent logs every call; the function's output stays its own

    def _body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _answer(self, status, body, error=False, content_type="application/octet-stream"):
        self.send_response(status)
        if error:
            self.send_header("x-fc-status", "404")
            content_type = "application/json"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _fail(self, exc, status):
        body = error_body(exc)
        if not isinstance(exc, HandlerError):
            LOGGER.error("%s: %s\n%s", body["errorType"], body["errorMessage"],
                         "".join(body["stackTrace"]).rstrip())
        else:
            LOGGER.error("%s: %s", body["errorType"], body["errorMessage"])
        self._answer(status, json.dumps(body).encode("utf-8"), error=True)

    def _headers(self):
        return {k.lower(): v for k, v in self.headers.items()}

    def _http_call(self):
        """Serve an HTTP trigger's call if this request is one."""
        headers = self._headers()
        if headers.get("x-fc-control-path") != HTTP_INVOKE:
            return False
        body = self._body()
        _local.request_id = headers.get("x-fc-request-id", "")
        context = FCContext(headers)
        try:
            fn = load(context.function.handler)
            event = json.dumps(http_event(self.command, self.path, headers, body, context))
            status, out_headers, out = http_response(fn(event.encode("utf-8"), context))
        except Exception as exc:  # noqa: BLE001 - the function's error, reported
            self._fail(exc, 404)
            return True
        finally:
            _local.request_id = ""
        self.send_response(status)
        for k, v in out_headers.items():
            if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(k, v)
        if not any(k.lower() == "content-type" for k in out_headers):
            self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)
        return True

    def do_PUT(self):
        self._http_call() or self._answer(404, b"")

    do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_PUT

    def do_POST(self):
        if self._http_call():
            return
        headers = self._headers()
        body = self._body()
        _local.request_id = headers.get("x-fc-request-id", "")
        try:
            if self.path == "/invoke":
                self.invoke(headers, body)
            elif self.path == "/initialize":
                _initializer[:] = [
                    headers.get("x-fc-function-initializer", ""),
                    headers.get("x-fc-initialization-timeout", "0"),
                ]
                self.hook("Initialize", _initializer[0], headers)
            else:
                self._answer(404, b"", error=False)
        finally:
            _local.request_id = ""

    def do_GET(self):
        if self._http_call():
            return
        headers = self._headers()
        _local.request_id = headers.get("x-fc-request-id", "")
        try:
            if self.path == "/pre-stop":
                self.hook(
                    "PreStop", headers.get("x-fc-instance-lifecycle-pre-stop-handler", ""), headers
                )
            else:
                self._answer(404, b"")
        finally:
            _local.request_id = ""

    def invoke(self, headers, body):
        context = FCContext(headers)
        try:
            fn = load(context.function.handler)
            result = encode_result(fn(body, context))
        except Exception as exc:  # noqa: BLE001 - the function's error, reported
            self._fail(exc, 404)
            return
        self._answer(200, result)

    def hook(self, name, handler, headers):
        global _initialized
        context = FCContext(headers)
        rid = context.request_id
        print("FC %s Start RequestId: %s" % (name, rid), flush=True)
        try:
            if name == "Initialize" and _initialized:
                pass  # FC runs the initializer once per instance
            elif handler:
                load(handler)(context)
                if name == "Initialize":
                    _initialized = True
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, 404)
            print("FC %s End RequestId: %s, Error: Unhandled function error" % (name, rid), flush=True)
            return
        print("FC %s End RequestId: %s" % (name, rid), flush=True)
        self._answer(200, b"")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # A burst of cold calls must not find a full backlog.
    request_queue_size = 128
    allow_reuse_address = True


def main():
    port = int(os.environ.get("FC_CUSTOM_LISTEN_PORT") or os.environ.get("FC_SERVER_PORT") or 9000)
    server = Server(("0.0.0.0", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


if __name__ == "__main__":
    main()
