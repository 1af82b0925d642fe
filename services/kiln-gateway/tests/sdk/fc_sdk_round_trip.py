"""Drive a Kiln gateway with the official FC 2023-03-30 Python SDK, unchanged
but for endpoint, keys and CA. Arguments: endpoint ak sk ca zip-path."""
import base64
import sys

from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from Tea.exceptions import TeaException

endpoint, ak, sk, ca, zip_path = sys.argv[1:6]
client = Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=endpoint,
                       protocol="https", ca=ca, region_id="cn-test"))
code = base64.b64encode(open(zip_path, "rb").read()).decode()

created = client.create_function(models.CreateFunctionRequest(body=models.CreateFunctionInput(
    function_name="sdk-fn", runtime="custom.debian12", handler="index.handler",
    memory_size=512, timeout=5, instance_concurrency=2,
    environment_variables={"A": "1"},
    custom_runtime_config=models.CustomRuntimeConfig(command=["python3", "/code/app.py"], port=9000),
    code=models.InputCodeLocation(zip_file=code))))
f = created.body
assert f.function_name == "sdk-fn" and f.memory_size == 512, f.to_map()
assert f.code_size > 0 and f.code_checksum, f.to_map()
assert f.function_arn.endswith(":functions/sdk-fn"), f.function_arn

got = client.get_function("sdk-fn", models.GetFunctionRequest()).body
assert got.function_id == f.function_id

listed = client.list_functions(models.ListFunctionsRequest(prefix="sdk-", limit=10)).body
assert [x.function_name for x in listed.functions] == ["sdk-fn"], listed.to_map()

updated = client.update_function("sdk-fn", models.UpdateFunctionRequest(
    body=models.UpdateFunctionInput(memory_size=1024))).body
assert updated.memory_size == 1024 and updated.cpu == 0.5, updated.to_map()

inv = client.invoke_function("sdk-fn", models.InvokeFunctionRequest(body=b"hello sdk"))
assert inv.status_code == 200, inv.status_code
payload = inv.body.read() if hasattr(inv.body, "read") else inv.body
assert payload == b"hello sdk", payload
assert inv.headers.get("x-fc-request-id"), inv.headers

try:
    client.update_function("sdk-fn", models.UpdateFunctionRequest(
        body=models.UpdateFunctionInput(memory_size=100)))
    raise AssertionError("bad memory accepted")
except TeaException as e:
    assert e.code == "InvalidArgument", (e.code, e.message)

client.delete_function("sdk-fn")
try:
    client.get_function("sdk-fn", models.GetFunctionRequest())
    raise AssertionError("deleted function still there")
except TeaException as e:
    assert e.code == "FunctionNotFound", (e.code, e.message)
print("SDK round trip ok")
