"""Drive a Kiln gateway's versions, aliases and qualified invocations with
the official FC 2023-03-30 Python SDK, unchanged but for endpoint, keys and
CA. Arguments: endpoint ak sk ca zip-path-1 zip-path-2."""
import base64
import ssl
import sys
import urllib.request

from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from Tea.exceptions import TeaException

endpoint, ak, sk, ca, zip1, zip2 = sys.argv[1:7]
client = Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=endpoint,
                       protocol="https", ca=ca, region_id="cn-test"))
code = lambda p: models.InputCodeLocation(zip_file=base64.b64encode(open(p, "rb").read()).decode())
name = "sdk-ver"


def refused(code_, f):
    try:
        f()
    except TeaException as e:
        assert e.code == code_, (e.code, e.message)
        return
    raise AssertionError("accepted, expected " + code_)


client.create_function(models.CreateFunctionRequest(body=models.CreateFunctionInput(
    function_name=name, runtime="custom.debian12", handler="index.handler",
    custom_runtime_config=models.CustomRuntimeConfig(command=["python3", "/code/app.py"], port=9000),
    code=code(zip1))))
v1 = client.publish_function_version(name, models.PublishFunctionVersionRequest(
    body=models.PublishVersionInput(description="first"))).body
assert v1.version_id == "1" and v1.description == "first" and v1.created_time, v1.to_map()
refused("InvalidArgument", lambda: client.publish_function_version(
    name, models.PublishFunctionVersionRequest(body=models.PublishVersionInput())))
client.update_function(name, models.UpdateFunctionRequest(
    body=models.UpdateFunctionInput(code=code(zip2))))
v2 = client.publish_function_version(name, models.PublishFunctionVersionRequest(
    body=models.PublishVersionInput())).body
assert v2.version_id == "2", v2.to_map()

listed = client.list_function_versions(name, models.ListFunctionVersionsRequest(limit=1)).body
assert [v.version_id for v in listed.versions] == ["2"] and listed.next_token, listed.to_map()
assert listed.direction == "BACKWARD", listed.to_map()
rest = client.list_function_versions(name, models.ListFunctionVersionsRequest(
    limit=1, next_token=listed.next_token)).body
assert [v.version_id for v in rest.versions] == ["1"] and not rest.next_token, rest.to_map()
fwd = client.list_function_versions(name, models.ListFunctionVersionsRequest(direction="FORWARD")).body
assert [v.version_id for v in fwd.versions] == ["1", "2"], fwd.to_map()

alias = client.create_alias(name, models.CreateAliasRequest(body=models.CreateAliasInput(
    alias_name="prod", version_id="1", description="live",
    additional_version_weight={"2": 0.1}))).body
assert alias.alias_name == "prod" and alias.version_id == "1", alias.to_map()
assert alias.additional_version_weight == {"2": 0.1}, alias.to_map()
refused("AliasAlreadyExists", lambda: client.create_alias(name, models.CreateAliasRequest(
    body=models.CreateAliasInput(alias_name="prod", version_id="1"))))
refused("VersionNotFound", lambda: client.create_alias(name, models.CreateAliasRequest(
    body=models.CreateAliasInput(alias_name="x", version_id="9"))))
got = client.get_alias(name, "prod").body
assert got.to_map() == alias.to_map(), (got.to_map(), alias.to_map())
aliases = client.list_aliases(name, models.ListAliasesRequest(prefix="pr")).body
assert [a.alias_name for a in aliases.aliases] == ["prod"], aliases.to_map()

# (The test's fake agent echoes the payload; which version ran is the
# scheduler's to see, checked by the Rust tests.)
for q in ["1", "2", "LATEST"]:
    inv = client.invoke_function(name, models.InvokeFunctionRequest(qualifier=q, body=b"x"))
    assert inv.status_code == 200, inv.status_code
refused("AliasNotFound", lambda: client.invoke_function(
    name, models.InvokeFunctionRequest(qualifier="nope", body=b"x")))

ctx = ssl.create_default_context(cafile=ca)
for q, path in [("1", zip1), ("2", zip2)]:
    out = client.get_function_code(name, models.GetFunctionCodeRequest(qualifier=q)).body
    got_zip = urllib.request.urlopen(out.url, context=ctx).read()
    assert got_zip == open(path, "rb").read(), q
    assert out.checksum, out.to_map()
f1 = client.get_function(name, models.GetFunctionRequest(qualifier="1")).body
assert f1.code_checksum == client.get_function_code(
    name, models.GetFunctionCodeRequest(qualifier="1")).body.checksum

# Async invoke configs per qualifier: the alias's own, beside LATEST's.
put = client.put_async_invoke_config(name, models.PutAsyncInvokeConfigRequest(
    qualifier="prod", body=models.PutAsyncInvokeConfigInput(max_async_retry_attempts=0))).body
assert put.max_async_retry_attempts == 0 and put.function_arn.endswith("/aliases/prod"), put.to_map()
client.put_async_invoke_config(name, models.PutAsyncInvokeConfigRequest(
    body=models.PutAsyncInvokeConfigInput(max_async_retry_attempts=2)))
got = client.get_async_invoke_config(name, models.GetAsyncInvokeConfigRequest(qualifier="prod")).body
assert got.max_async_retry_attempts == 0, got.to_map()
got = client.get_async_invoke_config(name, models.GetAsyncInvokeConfigRequest()).body
assert got.max_async_retry_attempts == 2, got.to_map()
refused("AliasNotFound", lambda: client.put_async_invoke_config(name, models.PutAsyncInvokeConfigRequest(
    qualifier="nope", body=models.PutAsyncInvokeConfigInput(max_async_retry_attempts=1))))
refused("AsyncConfigNotExists", lambda: client.get_async_invoke_config(
    name, models.GetAsyncInvokeConfigRequest(qualifier="1")))
listed = client.list_async_invoke_configs(models.ListAsyncInvokeConfigsRequest(function_name=name)).body
assert [c.function_arn.rsplit(":", 1)[1] for c in listed.configs] == [
    "functions/" + name, "functions/" + name + "/aliases/prod"], listed.to_map()
client.delete_async_invoke_config(name, models.DeleteAsyncInvokeConfigRequest(qualifier="prod"))
refused("AsyncConfigNotExists", lambda: client.get_async_invoke_config(
    name, models.GetAsyncInvokeConfigRequest(qualifier="prod")))
client.delete_async_invoke_config(name, models.DeleteAsyncInvokeConfigRequest())

rolled = client.update_alias(name, "prod", models.UpdateAliasRequest(body=models.UpdateAliasInput(
    version_id="2", additional_version_weight={}))).body
assert rolled.version_id == "2" and rolled.description == "live", rolled.to_map()
refused("InvalidArgument", lambda: client.delete_function_version(name, "2"))
client.delete_function_version(name, "1")
client.delete_alias(name, "prod")
refused("AliasNotFound", lambda: client.get_alias(name, "prod"))
client.delete_function_version(name, "2")
refused("VersionNotFound", lambda: client.delete_function_version(name, "2"))
client.delete_function(name)
print("SDK versions ok")
