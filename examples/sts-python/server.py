"""A Kiln function (`custom.debian12`, python3's standard library only)
that shows the temporary credentials of its role.

When a function has a role (FC's `role`, `acs:ram::<accountId>:role/<name>`),
Kiln gives each instance short-lived credentials for it:

- at start, in the environment: ALIBABA_CLOUD_ACCESS_KEY_ID,
  ALIBABA_CLOUD_ACCESS_KEY_SECRET, ALIBABA_CLOUD_SECURITY_TOKEN;
- on every call, refreshed before they expire: the x-fc-access-key-id,
  x-fc-access-key-secret and x-fc-security-token headers.

Code that calls Kiln's API signs with them (ACS3-HMAC-SHA256, sending the
token in x-acs-security-token, as the official SDKs do with STS
credentials). This function answers both sets, so a caller (Kiln's tests)
can use them:

  {"env": {"accessKeyId", "accessKeySecret", "securityToken"},
   "headers": {"accessKeyId", "accessKeySecret", "securityToken"}}
"""

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
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
        return self._answer(200, {"env": env, "headers": headers})

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
