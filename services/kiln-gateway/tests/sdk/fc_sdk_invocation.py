"""Drive a Kiln gateway's DisableFunctionInvocation and
EnableFunctionInvocation with the official FC 2023-03-30 Python SDK,
unchanged but for endpoint, keys and CA. Arguments: endpoint ak sk ca zip-path."""
import base64
import sys

from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from darabonba.runtime import RuntimeOptions
from Tea.exceptions import TeaException

endpoint, ak, sk, ca, zip_path = sys.argv[1:6]
client = Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=endpoint,
                       protocol="https", ca=ca, region_id="cn-test"))
code = models.InputCodeLocation(zip_file=base64.b64encode(open(zip_path, "rb").read()).decode())


def refused(code_, f):
    try:
        f()
    except TeaException as e:
        assert e.code == code_, (e.code, e.message)
        return e
    raise AssertionError("accepted, expected " + code_)


name = "sdk-disable"
client.create_function(models.CreateFunctionRequest(body=models.CreateFunctionInput(
    function_name=name, runtime="custom.debian12", handler="index.handler",
    custom_runtime_config=models.CustomRuntimeConfig(command=["python3", "/code/app.py"], port=9000),
    code=code)))
assert client.get_function(name, models.GetFunctionRequest()).body.invocation_restriction is None

r = client.disable_function_invocation(name, models.DisableFunctionInvocationRequest(
    reason="planned maintenance", abort_ongoing_request=True)).body
assert r.success is True, r.to_map()
f = client.get_function(name, models.GetFunctionRequest()).body
assert f.invocation_restriction.disable is True, f.to_map()
assert f.invocation_restriction.reason == "planned maintenance", f.to_map()
assert f.invocation_restriction.last_modified_time, f.to_map()

e = refused("FunctionInvocationDisabled", lambda: client.invoke_function(
    name, models.InvokeFunctionRequest(body=b"{}")))
assert "planned maintenance" in e.message, e.message
refused("FunctionInvocationDisabled", lambda: client.invoke_function_with_options(
    name, models.InvokeFunctionRequest(body=b"{}"),
    models.InvokeFunctionHeaders(x_fc_invocation_type="Async"), RuntimeOptions()))
refused("FunctionNotFound", lambda: client.disable_function_invocation(
    "no-such-function", models.DisableFunctionInvocationRequest()))

r = client.enable_function_invocation(name).body
assert r.success is True, r.to_map()
f = client.get_function(name, models.GetFunctionRequest()).body
assert f.invocation_restriction.disable is False, f.to_map()
client.delete_function(name)
print("SDK invocation restriction ok")
