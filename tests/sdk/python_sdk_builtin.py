#!/usr/bin/env python3
"""The built-in runtimes (python3.11, nodejs18) driven by the official Python SDK for FC 3.0
(alibabacloud-fc20230330), unmodified.

    python tests/sdk/python_sdk_builtin.py CREDENTIALS.json RUNTIME=CODE.zip ...

e.g. `python3.11=python-hello.zip nodejs18=nodejs-hello.zip` (the repository's examples).
Per runtime (one line per step, "ok"/"FAIL"; exit status 1 on the first failure):
CreateFunction with a handler that is not module.function is InvalidArgument and creates
nothing; CreateFunction with `index.handler` and an initializer; InvokeFunction twice, each
answer echoing the event with the call's request id and showing the initializer ran once;
an event that makes the handler raise answers FC's error body with x-fc-error-type
UnhandledInvocationError; DeleteFunction. Functions created are deleted even on failure.
"""

import base64
import json
import sys
import uuid

from alibabacloud_fc20230330 import models as fc
from alibabacloud_tea_openapi import exceptions as openapi_exceptions
from darabonba.runtime import RuntimeOptions

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from python_sdk import StepFailed, check, make_client, step  # noqa: E402


def run(client, runtime, code):
    name = f"sdk-{runtime.replace('.', '')}-{uuid.uuid4().hex[:6]}"
    created = []

    def create_input(handler):
        return fc.CreateFunctionInput(
            function_name=name,
            runtime=runtime,
            handler=handler,
            memory_size=256,
            timeout=30,
            instance_lifecycle_config=fc.InstanceLifecycleConfig(
                initializer=fc.LifecycleHook(handler="index.initialize", timeout=10)),
            code=fc.InputCodeLocation(zip_file=base64.b64encode(code).decode()),
        )

    def bad_handler():
        try:
            client.create_function(fc.CreateFunctionRequest(body=create_input("handler")))
        except openapi_exceptions.ClientException as e:
            check(e.code == "InvalidArgument", f"code {e.code!r}")
            check("module.function" in str(e), f"message {e}")
        else:
            created.append(name)
            raise AssertionError("a handler without a module was accepted")
        try:
            client.get_function(name, fc.GetFunctionRequest())
        except openapi_exceptions.ClientException as e:
            check(e.code == "FunctionNotFound", f"code {e.code!r}")
            return "InvalidArgument, nothing created"
        created.append(name)
        raise AssertionError("the refused function exists")

    def create():
        res = client.create_function(fc.CreateFunctionRequest(body=create_input("index.handler")))
        created.append(name)
        b = res.body
        check(b.runtime == runtime, f"runtime {b.runtime!r}")
        check(b.handler == "index.handler", f"handler {b.handler!r}")
        return f"{name} runtime={b.runtime}"

    def invoke(payload):
        res = client.invoke_function_with_options(
            name,
            fc.InvokeFunctionRequest(body=payload.encode()),
            fc.InvokeFunctionHeaders(x_fc_invocation_type="Sync"),
            RuntimeOptions(),
        )
        body = res.body.read() if hasattr(res.body, "read") else res.body
        headers = {k.lower(): v for k, v in (res.headers or {}).items()}
        return res.status_code, headers, json.loads(body)

    def calls():
        for i in range(2):
            event = {"n": i}
            status, headers, v = invoke(json.dumps(event))
            check(status == 200, f"status {status}: {v}")
            check("x-fc-error-type" not in headers, f"function error: {v}")
            check(v["event"] == event, f"event {v['event']!r}")
            check(v["requestId"] == headers.get("x-fc-request-id"),
                  f"requestId {v['requestId']!r} != {headers.get('x-fc-request-id')!r}")
            check(v["function"]["name"] == name, f"function {v['function']!r}")
            check(v["initializerRuns"] == 1, f"initializerRuns {v['initializerRuns']!r}")
        return "event echoed with the call's request id; the initializer ran once"

    def error():
        status, headers, v = invoke(json.dumps({"fail": "from the sdk"}))
        check(status == 200, f"status {status}")
        check(headers.get("x-fc-error-type") == "UnhandledInvocationError",
              f"x-fc-error-type {headers.get('x-fc-error-type')!r}")
        check(v["errorMessage"] == "from the sdk", f"errorMessage {v.get('errorMessage')!r}")
        check(isinstance(v.get("stackTrace"), list) and v["stackTrace"], f"stackTrace {v!r}")
        return f"{v['errorType']}: {v['errorMessage']}"

    def delete():
        client.delete_function(name)
        created.remove(name)
        return name

    try:
        step(f"{runtime} CreateFunction (bad handler)", bad_handler)
        step(f"{runtime} CreateFunction", create)
        step(f"{runtime} InvokeFunction x2", calls)
        step(f"{runtime} InvokeFunction (error)", error)
        step(f"{runtime} DeleteFunction", delete)
    finally:
        for n in created:
            try:
                client.delete_function(n)
            except Exception as e:  # best effort
                print(f"cleanup {n}: {e}", flush=True)


def main():
    with open(sys.argv[1]) as f:
        client = make_client(json.load(f))
    try:
        for pair in sys.argv[2:]:
            runtime, _, path = pair.partition("=")
            with open(path, "rb") as f:
                run(client, runtime, f.read())
    except StepFailed:
        sys.exit(1)


if __name__ == "__main__":
    main()
