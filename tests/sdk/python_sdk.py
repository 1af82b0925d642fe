#!/usr/bin/env python3
"""Drives Kiln with the official Python SDK for FC 3.0 (alibabacloud-fc20230330).

Run (Kiln's integration test does this in a virtualenv it creates):

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install -r tests/sdk/requirements.txt
    /tmp/venv/bin/python tests/sdk/python_sdk.py CREDENTIALS.json CODE.zip \
        [--name NAME] [--runtime custom.debian12] [--command python3 server.py] \
        [--payload '{"hello":"kiln"}'] [--expect SUBSTRING]

CREDENTIALS.json is what `kiln dev` writes: {"endpoint": "https://127.0.0.1:PORT",
"accountId", "accessKeyId", "accessKeySecret", "caCert": "/path/ca.pem"}. Options fall back
to the environment: KILN_SDK_NAME, KILN_SDK_RUNTIME, KILN_SDK_COMMAND (a JSON list),
KILN_SDK_PAYLOAD, KILN_SDK_EXPECT.

Nothing in the SDK is changed. The client is configured only with:
  - endpoint: the host:port of the credentials' endpoint (an explicit endpoint is used as
    the Host verbatim; the SDK prepends no account id or region to it), and protocol
    "https" (the scheme of the endpoint);
  - the access key id and secret;
  - ca: the path of the CA PEM to trust (Config.ca reaches `requests`' `verify=`);
  - read/connect timeouts long enough for a cold start.

Steps (one line each, "ok"/"FAIL"; exit status 1 on the first failure): CreateFunction (two
functions sharing a prefix), GetFunction, ListFunctions (prefix, limit 1, following
nextToken), UpdateFunction (memorySize and environment), InvokeFunction (body checked),
versions and aliases (PublishFunctionVersion twice, ListFunctionVersions, CreateAlias with a
canary weight, InvokeFunction by version and alias, GetFunctionCode with its download,
UpdateAlias rolling forward, GetAlias, ListAliases, DeleteAlias, DeleteFunctionVersion),
an HTTP trigger with authType function (a call signed by the SDK taken, an unsigned one
refused), DeleteFunction, and GetFunction again expecting FC's FunctionNotFound error
(404, {"Code","Message","RequestId"}). Functions created are deleted even on failure.

With the repository's examples/hello-python zip the invoke check is exact (echo,
function name, memory and environment after the update); for another function pass
--expect with a substring of the expected response body.
"""

import argparse
import base64
import json
import os
import ssl
import sys
import socket
import urllib.error
import urllib.request
import uuid

from alibabacloud_fc20230330 import models as fc
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi import exceptions as openapi_exceptions
from alibabacloud_tea_openapi import models as openapi
from darabonba.runtime import RuntimeOptions


class StepFailed(Exception):
    pass


def step(name, fn):
    try:
        detail = fn()
    except Exception as e:  # every failure, SDK or check, ends the run
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        raise StepFailed(name) from e
    print(f"ok   {name}: {detail}", flush=True)
    return detail


def check(cond, message):
    if not cond:
        raise AssertionError(message)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("credentials")
    p.add_argument("zip")
    p.add_argument("--name", default=os.environ.get("KILN_SDK_NAME") or f"sdkpy-{uuid.uuid4().hex[:8]}")
    p.add_argument("--runtime", default=os.environ.get("KILN_SDK_RUNTIME", "custom.debian12"))
    p.add_argument("--command", nargs="+",
                   default=json.loads(os.environ.get("KILN_SDK_COMMAND", '["python3", "server.py"]')))
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--payload", default=os.environ.get("KILN_SDK_PAYLOAD", '{"hello": "kiln"}'))
    p.add_argument("--expect", default=os.environ.get("KILN_SDK_EXPECT"))
    return p.parse_args()


# Names under localhost are the loopback address (RFC 6761; curl and
# browsers know it, glibc's resolver may not): the trigger's host resolves
# here without touching the SDK.
_getaddrinfo = socket.getaddrinfo


def _localhost_aware(host, *rest, **kw):
    if isinstance(host, str) and host.endswith(".localhost"):
        host = "127.0.0.1"
    return _getaddrinfo(host, *rest, **kw)


socket.getaddrinfo = _localhost_aware


def make_client(cred):
    endpoint = cred["endpoint"]
    scheme, sep, hostport = endpoint.partition("://")
    if not sep:
        scheme, hostport = "https", endpoint
    return Client(openapi.Config(
        access_key_id=cred["accessKeyId"],
        access_key_secret=cred["accessKeySecret"],
        endpoint=hostport.rstrip("/"),
        protocol=scheme,
        ca=cred.get("caCert"),
        connect_timeout=10_000,
        read_timeout=180_000,
    ))


def main():
    args = parse_args()
    with open(args.credentials) as f:
        cred = json.load(f)
    with open(args.zip, "rb") as f:
        code = f.read()
    client = make_client(cred)
    print(f"ok   client: endpoint={cred['endpoint']} account={cred.get('accountId')} "
          f"function={args.name}", flush=True)

    names = [args.name, args.name + "-b"]
    created = []

    def create(name, greeting):
        res = client.create_function(fc.CreateFunctionRequest(body=fc.CreateFunctionInput(
            function_name=name,
            runtime=args.runtime,
            handler="index.handler",
            memory_size=512,
            timeout=60,
            instance_concurrency=2,
            environment_variables={"GREETING": greeting},
            custom_runtime_config=fc.CustomRuntimeConfig(command=args.command, port=args.port),
            code=fc.InputCodeLocation(zip_file=base64.b64encode(code).decode()),
        )))
        created.append(name)
        b = res.body
        check(res.status_code in (200, 201), f"status {res.status_code}")
        check(b.function_name == name, f"functionName {b.function_name!r}")
        check(b.runtime == args.runtime, f"runtime {b.runtime!r}")
        check(b.memory_size == 512, f"memorySize {b.memory_size!r}")
        check(b.code_size == len(code), f"codeSize {b.code_size!r} != {len(code)}")
        check(bool(b.code_checksum), "codeChecksum missing")
        return f"{name} codeSize={b.code_size} codeChecksum={b.code_checksum}"

    def get():
        b = client.get_function(args.name, fc.GetFunctionRequest()).body
        check(b.function_name == args.name, f"functionName {b.function_name!r}")
        check(b.custom_runtime_config.command == args.command,
              f"command {b.custom_runtime_config.command!r}")
        check(b.environment_variables == {"GREETING": "hello from the python sdk"},
              f"environmentVariables {b.environment_variables!r}")
        return f"{b.function_name} runtime={b.runtime} memorySize={b.memory_size} timeout={b.timeout}"

    def list_all():
        seen, token, pages = [], None, 0
        while True:
            pages += 1
            check(pages <= 10, "nextToken never ran out")
            body = client.list_functions(fc.ListFunctionsRequest(
                prefix=args.name, limit=1, next_token=token)).body
            got = [f.function_name for f in (body.functions or [])]
            check(len(got) <= 1, f"limit 1 returned {got}")
            seen += got
            token = body.next_token
            if not token:
                break
        check(sorted(seen) == sorted(names), f"listed {seen}, expected {names}")
        return f"{seen} in {pages} pages"

    def update():
        b = client.update_function(args.name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(
            memory_size=1024,
            environment_variables={"GREETING": "updated by the python sdk"},
        ))).body
        check(b.memory_size == 1024, f"memorySize {b.memory_size!r}")
        check(b.environment_variables == {"GREETING": "updated by the python sdk"},
              f"environmentVariables {b.environment_variables!r}")
        again = client.get_function(args.name, fc.GetFunctionRequest()).body
        check(again.memory_size == 1024, f"GetFunction after update: memorySize {again.memory_size!r}")
        return f"memorySize={b.memory_size} lastModifiedTime={b.last_modified_time}"

    def invoke():
        res = client.invoke_function_with_options(
            args.name,
            fc.InvokeFunctionRequest(body=args.payload.encode()),
            fc.InvokeFunctionHeaders(x_fc_invocation_type="Sync"),
            RuntimeOptions(),
        )
        body = res.body.read() if hasattr(res.body, "read") else res.body
        text = body.decode("utf-8", "replace")
        check(res.status_code == 200, f"status {res.status_code}: {text[:300]}")
        headers = {k.lower(): v for k, v in (res.headers or {}).items()}
        check("x-fc-error-type" not in headers, f"function error {headers.get('x-fc-error-type')}: {text[:300]}")
        check(headers.get("x-fc-request-id"), "x-fc-request-id missing")
        if args.expect is not None:
            check(args.expect in text, f"{args.expect!r} not in {text[:300]!r}")
        else:
            result = json.loads(text)
            if "echo" in result:  # examples/hello-python
                check(result["echo"] == args.payload, f"echo {result['echo']!r}")
                check(result.get("functionName") == args.name, f"functionName {result.get('functionName')!r}")
                check(result.get("memory") == "1024", f"memory {result.get('memory')!r} (update not applied?)")
                check(result.get("env") == "updated by the python sdk", f"env {result.get('env')!r}")
        return f"{res.status_code} request-id={headers.get('x-fc-request-id')} body={text[:120]}"

    def call_env(qualifier):
        res = client.invoke_function_with_options(
            args.name,
            fc.InvokeFunctionRequest(qualifier=qualifier, body=args.payload.encode()),
            fc.InvokeFunctionHeaders(x_fc_invocation_type="Sync"),
            RuntimeOptions(),
        )
        body = res.body.read() if hasattr(res.body, "read") else res.body
        check(res.status_code == 200, f"{qualifier}: status {res.status_code}: {body[:300]!r}")
        result = json.loads(body)
        return result.get("env") if "echo" in result else None

    def versions():
        v1 = client.publish_function_version(args.name, fc.PublishFunctionVersionRequest(
            body=fc.PublishVersionInput(description="first"))).body
        check(v1.version_id == "1" and v1.description == "first", f"version {v1.to_map()}")
        client.update_function(args.name, fc.UpdateFunctionRequest(body=fc.UpdateFunctionInput(
            environment_variables={"GREETING": "version two"})))
        v2 = client.publish_function_version(args.name, fc.PublishFunctionVersionRequest(
            body=fc.PublishVersionInput())).body
        check(v2.version_id == "2", f"version {v2.to_map()}")
        listed = client.list_function_versions(args.name, fc.ListFunctionVersionsRequest()).body
        check([v.version_id for v in listed.versions] == ["2", "1"], f"versions {listed.to_map()}")
        alias = client.create_alias(args.name, fc.CreateAliasRequest(body=fc.CreateAliasInput(
            alias_name="prod", version_id="1", additional_version_weight={"2": 0.5}))).body
        check(alias.additional_version_weight == {"2": 0.5}, f"alias {alias.to_map()}")
        # examples/hello-python answers with its environment: each version's own.
        envs = {q: call_env(q) for q in ("1", "2", "LATEST")}
        if envs["1"] is not None:
            check(envs == {"1": "updated by the python sdk", "2": "version two", "LATEST": "version two"},
                  f"each version's environment: {envs}")
        split = {call_env("prod") for _ in range(40)}
        if envs["1"] is not None:
            check(split == {"updated by the python sdk", "version two"}, f"alias split {split}")
        code_out = client.get_function_code(args.name, fc.GetFunctionCodeRequest(qualifier="1")).body
        ctx = ssl.create_default_context(cafile=cred.get("caCert"))
        with urllib.request.urlopen(code_out.url, context=ctx, timeout=30) as got:
            check(got.status == 200 and got.read() == code, f"code download {got.status}")
        rolled = client.update_alias(args.name, "prod", fc.UpdateAliasRequest(body=fc.UpdateAliasInput(
            version_id="2", additional_version_weight={}))).body
        check(rolled.version_id == "2", f"alias {rolled.to_map()}")
        if envs["1"] is not None:
            after = {call_env("prod") for _ in range(10)}
            check(after == {"version two"}, f"after the roll: {after}")
        check(client.get_alias(args.name, "prod").body.version_id == "2", "GetAlias")
        names_ = [a.alias_name for a in client.list_aliases(args.name, fc.ListAliasesRequest()).body.aliases]
        check(names_ == ["prod"], f"aliases {names_}")
        try:
            client.delete_function_version(args.name, "2")
            raise AssertionError("deleted the version an alias uses")
        except openapi_exceptions.ClientException as e:
            check(e.code == "InvalidArgument", f"code {e.code!r}")
        client.delete_alias(args.name, "prod")
        for v in ("1", "2"):
            client.delete_function_version(args.name, v)
        return f"versions 1, 2; alias split {sorted(split, key=str)}; code {len(code)} bytes"

    def signed_trigger():
        """An HTTP trigger with authType function: a request the SDK signs
        (its own ACS3 signer, through call_api at the trigger's host) is
        taken, an unsigned one refused."""
        t = client.create_trigger(args.name, fc.CreateTriggerRequest(body=fc.CreateTriggerInput(
            trigger_name="signed", trigger_type="http",
            trigger_config=json.dumps({"authType": "function", "methods": ["POST"]})))).body
        url = t.http_trigger.url_internet
        host = url.partition("://")[2]
        trigger_client = make_client(dict(cred, endpoint="https://" + host))
        params = openapi.Params(action="InvokeHttpTrigger", version="2023-03-30", protocol="HTTPS",
                                pathname="/invoke", method="POST", auth_type="AK", style="ROA",
                                req_body_type="json", body_type="json")
        got = trigger_client.call_api(params, openapi.OpenApiRequest(body={"hello": "signed"}),
                                      RuntimeOptions())
        check(got.get("statusCode") == 200, f"signed call answered {got.get('statusCode')}")
        check("echo" in (got.get("body") or {}), f"the function answered: {got.get('body')!r}")
        ctx = ssl.create_default_context(cafile=cred.get("caCert"))
        req = urllib.request.Request(url + "/invoke", data=b"{}", method="POST")
        try:
            urllib.request.urlopen(req, context=ctx, timeout=30)
            raise AssertionError("an unsigned call to an authType function trigger was taken")
        except urllib.error.HTTPError as e:
            check(e.code == 403, f"unsigned call answered {e.code}")
        client.delete_trigger(args.name, "signed")
        return f"{host}: signed 200, unsigned 403"

    def drop_versions(name):
        for a in client.list_aliases(name, fc.ListAliasesRequest()).body.aliases or []:
            client.delete_alias(name, a.alias_name)
        for v in client.list_function_versions(name, fc.ListFunctionVersionsRequest()).body.versions or []:
            client.delete_function_version(name, v.version_id)

    def delete(name):
        res = client.delete_function(name)
        created.remove(name)
        check(res.status_code in (200, 204), f"status {res.status_code}")
        return f"{name} status={res.status_code}"

    def get_deleted():
        try:
            client.get_function(args.name, fc.GetFunctionRequest())
        except openapi_exceptions.ClientException as e:
            check(e.status_code == 404, f"status {e.status_code}")
            check(e.code == "FunctionNotFound", f"code {e.code!r}")
            data = e.data or {}
            check(set(data) >= {"Code", "Message", "RequestId"}, f"error body {data!r}")
            check(data["RequestId"] and data["Message"], f"error body {data!r}")
            return f"{e.status_code} {e.code}: {data['Message']} (RequestId {data['RequestId']})"
        raise AssertionError("GetFunction of a deleted function succeeded")

    try:
        step("CreateFunction", lambda: create(names[0], "hello from the python sdk"))
        step("CreateFunction (second, same prefix)", lambda: create(names[1], "second"))
        step("GetFunction", get)
        step("ListFunctions", list_all)
        step("UpdateFunction", update)
        step("InvokeFunction", invoke)
        step("Versions and aliases", versions)
        step("HTTP trigger, authType function", signed_trigger)
        for name in names:
            step("DeleteFunction", lambda name=name: delete(name))
        step("GetFunction after delete", get_deleted)
    except StepFailed:
        for name in list(created):
            try:
                drop_versions(name)
                client.delete_function(name)
            except Exception as e:  # best effort
                print(f"     cleanup of {name} failed: {e}", flush=True)
        return 1
    print("ok   all steps passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
