"""A Kiln function (`custom.debian12`, python3's standard library only)
that uses the temporary credentials of its role to call Kiln's own API.

When a function has a role (FC's `role`, `acs:ram::<accountId>:role/<name>`),
Kiln gives each instance short-lived credentials for it:

- at start, in the environment: ALIBABA_CLOUD_ACCESS_KEY_ID,
  ALIBABA_CLOUD_ACCESS_KEY_SECRET, ALIBABA_CLOUD_SECURITY_TOKEN;
- on every call, refreshed before they expire: the x-fc-access-key-id,
  x-fc-access-key-secret and x-fc-security-token headers.

Every call answers both sets:

  {"env": {"accessKeyId", "accessKeySecret", "securityToken"},
   "headers": {"accessKeyId", "accessKeySecret", "securityToken"}}

An event with "api" makes the function call Kiln's API from inside its
instance, signing each request itself (ACS3-HMAC-SHA256 with the token in
x-acs-security-token, exactly as the official SDKs sign STS credentials):

  {"api": {"port": 8443,                 # the gateway's public port
           "host": "10.0.0.1",            # default: the instance's default gateway
           "serverName": "localhost",     # the name its certificate is checked against
           "ca": "-----BEGIN CERTIFICATE-----...",   # PEM of the CA to trust
           "requests": [{"method": "GET", "path": "/2023-03-30/functions/me",
                         "credentials": "env" | "headers"}]}}

and adds, per request, what the API answered:

  "api": [{"status": 200, "code": null} | {"status": 403, "code": "AccessDenied"}]
"""

import datetime
import hashlib
import hmac
import http.client
import json
import os
import socket
import ssl
import struct
import sys
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_VERSION = "2023-03-30"
ALGORITHM = "ACS3-HMAC-SHA256"


def default_gateway():
    """The next hop of the default route: the host side of the instance's
    link, where a `kiln dev` gateway listening on all addresses answers."""
    with open("/proc/net/route") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == "00000000" and int(fields[3], 16) & 0x2:
                return socket.inet_ntoa(struct.pack("<L", int(fields[2], 16)))
    raise RuntimeError("the instance has no default route")


def canonical_query(query):
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    return "&".join(
        f"{k}={urllib.parse.quote(v, safe='~')}" for k, v in sorted(pairs)
    )


def sign(method, path, query, headers, body, key_id, secret, token):
    """Add the x-acs-* headers and Authorization, signing every header (as
    alibabacloud_tea_openapi's get_authorization does)."""
    payload_hex = hashlib.sha256(body).hexdigest()
    headers.update(
        {
            "x-acs-version": API_VERSION,
            "x-acs-date": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "x-acs-signature-nonce": uuid.uuid4().hex,
            "x-acs-content-sha256": payload_hex,
            "x-acs-accesskey-id": key_id,
            "x-acs-security-token": token,
        }
    )
    lower = {k.lower(): v.strip() for k, v in headers.items()}
    names = sorted(lower)
    canonical = "\n".join(
        [
            method,
            path,
            canonical_query(query),
            "".join(f"{n}:{lower[n]}\n" for n in names),
            ";".join(names),
            payload_hex,
        ]
    )
    to_sign = ALGORITHM + "\n" + hashlib.sha256(canonical.encode()).hexdigest()
    signature = hmac.new(secret.encode(), to_sign.encode(), hashlib.sha256).hexdigest()
    headers["Authorization"] = (
        f"{ALGORITHM} Credential={key_id},SignedHeaders={';'.join(names)},"
        f"Signature={signature}"
    )


class GatewayConnection(http.client.HTTPSConnection):
    """HTTPS to an address whose certificate names another host (the dev
    gateway's certificate names localhost; the instance reaches it by the
    host's address on its link)."""

    def __init__(self, host, port, server_name, context):
        super().__init__(host, port, context=context, timeout=10)
        self._server_name = server_name

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


def call_api(spec, creds_by_source):
    host = spec.get("host") or default_gateway()
    port = int(spec["port"])
    context = ssl.create_default_context(cadata=spec["ca"])
    results = []
    for req in spec["requests"]:
        creds = creds_by_source[req.get("credentials", "env")]
        method = req.get("method", "GET")
        path, _, query = req["path"].partition("?")
        body = json.dumps(req["body"]).encode() if "body" in req else b""
        headers = {"host": f"{host}:{port}"}
        if body:
            headers["content-type"] = "application/json"
        sign(
            method,
            path,
            query,
            headers,
            body,
            creds["accessKeyId"],
            creds["accessKeySecret"],
            creds["securityToken"],
        )
        conn = GatewayConnection(host, port, spec.get("serverName") or "localhost", context)
        try:
            conn.request(method, req["path"], body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            try:
                code = json.loads(data).get("Code") if data else None
            except (ValueError, AttributeError):
                code = None
            results.append({"status": resp.status, "code": code})
        except (OSError, http.client.HTTPException) as e:
            results.append({"status": None, "code": None, "error": repr(e)})
        finally:
            conn.close()
        print(f"api {method} {req['path']} -> {results[-1]}", flush=True)
    return results


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path not in ("/invoke", "/initialize"):
            return self._answer(404, {"error": "unknown path " + self.path})
        env = {
            "accessKeyId": os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID"),
            "accessKeySecret": os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET"),
            "securityToken": os.environ.get("ALIBABA_CLOUD_SECURITY_TOKEN"),
        }
        headers = {
            "accessKeyId": self.headers.get("x-fc-access-key-id"),
            "accessKeySecret": self.headers.get("x-fc-access-key-secret"),
            "securityToken": self.headers.get("x-fc-security-token"),
        }
        print(f"credentials {headers['accessKeyId']}", flush=True)
        answer = {"env": env, "headers": headers}
        try:
            event = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return self._answer(400, {"error": "the event is not JSON"})
        if isinstance(event, dict) and isinstance(event.get("api"), dict):
            try:
                answer["api"] = call_api(event["api"], {"env": env, "headers": headers})
            except (KeyError, TypeError, ValueError, RuntimeError, ssl.SSLError) as e:
                return self._answer(400, {"error": f"bad api request: {e!r}"})
        return self._answer(200, answer)

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main():
    port = int(os.environ.get("FC_CUSTOM_LISTEN_PORT") or "9000")
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
