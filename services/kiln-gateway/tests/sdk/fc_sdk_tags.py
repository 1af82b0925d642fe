"""Drive a Kiln gateway's function tags (TagResources, UntagResources,
ListTagResources) with the official FC 2023-03-30 Python SDK, unchanged
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
code = models.InputCodeLocation(zip_file=base64.b64encode(open(zip_path, "rb").read()).decode())


def refused(code_, f):
    try:
        f()
    except TeaException as e:
        assert e.code == code_, (e.code, e.message)
        return
    raise AssertionError("accepted, expected " + code_)


for name in ["sdk-tag-a", "sdk-tag-b"]:
    client.create_function(models.CreateFunctionRequest(body=models.CreateFunctionInput(
        function_name=name, runtime="custom.debian12", handler="index.handler",
        custom_runtime_config=models.CustomRuntimeConfig(command=["python3", "/code/app.py"], port=9000),
        code=code)))
arn_a = client.get_function("sdk-tag-a", models.GetFunctionRequest()).body.function_arn

tag = lambda k, v: models.Tag(key=k, value=v)
client.tag_resources(models.TagResourcesRequest(body=models.TagResourcesInput(
    resource_type="function", resource_id=[arn_a, "sdk-tag-b"],
    tag=[tag("team", "shop"), tag("tier", "1")])))
client.tag_resources(models.TagResourcesRequest(body=models.TagResourcesInput(
    resource_type="function", resource_id=["sdk-tag-b"], tag=[tag("tier", "2")])))

listed = client.list_tag_resources(models.ListTagResourcesRequest(resource_type="function")).body
rows = sorted((r.resource_id.rsplit("/", 1)[1], r.tag_key, r.tag_value) for r in listed.tag_resources)
assert rows == [("sdk-tag-a", "team", "shop"), ("sdk-tag-a", "tier", "1"),
                ("sdk-tag-b", "team", "shop"), ("sdk-tag-b", "tier", "2")], rows
assert all(r.resource_type == "function" for r in listed.tag_resources), listed.to_map()

# By tag, and paged.
only = client.list_tag_resources(models.ListTagResourcesRequest(
    resource_type="function",
    tag=[models.ListTagResourcesRequestTag(key="tier", value="2")])).body
assert {r.resource_id.rsplit("/", 1)[1] for r in only.tag_resources} == {"sdk-tag-b"}, only.to_map()
page = client.list_tag_resources(models.ListTagResourcesRequest(resource_type="function", limit=3)).body
assert len(page.tag_resources) == 3 and page.next_token, page.to_map()
rest = client.list_tag_resources(models.ListTagResourcesRequest(
    resource_type="function", limit=3, next_token=page.next_token)).body
assert len(rest.tag_resources) == 1 and not rest.next_token, rest.to_map()

# GetFunction shows them; ListFunctions filters on them (the SDK sends
# its tags filter as JSON), with its other filters.
f = client.get_function("sdk-tag-b", models.GetFunctionRequest()).body
assert {(t.key, t.value) for t in f.tags} == {("team", "shop"), ("tier", "2")}, f.to_map()
fs = client.list_functions(models.ListFunctionsRequest(prefix="sdk-tag-", tags=[tag("tier", "1")])).body
assert [x.function_name for x in fs.functions] == ["sdk-tag-a"], fs.to_map()
fs = client.list_functions(models.ListFunctionsRequest(
    prefix="sdk-tag-", runtime="custom.debian12", fc_version="v3", function_name="sdk-tag-b")).body
assert [x.function_name for x in fs.functions] == ["sdk-tag-b"], fs.to_map()
fs = client.list_functions(models.ListFunctionsRequest(prefix="sdk-tag-", gpu_type="fc.gpu.tesla.1")).body
assert not fs.functions, fs.to_map()

client.untag_resources(models.UntagResourcesRequest(
    resource_type="function", resource_id=["sdk-tag-a"], tag_key=["tier"]))
client.untag_resources(models.UntagResourcesRequest(
    resource_type="function", resource_id=["sdk-tag-b"], all=True))
listed = client.list_tag_resources(models.ListTagResourcesRequest(
    resource_type="function", resource_id=["sdk-tag-a", "sdk-tag-b"])).body
rows = [(r.resource_id.rsplit("/", 1)[1], r.tag_key) for r in listed.tag_resources]
assert rows == [("sdk-tag-a", "team")], rows

# Refusals change nothing.
refused("InvalidArgument", lambda: client.tag_resources(models.TagResourcesRequest(
    body=models.TagResourcesInput(resource_type="function", resource_id=["sdk-tag-a"],
                                  tag=[tag("aliyun:owner", "x")]))))
refused("FunctionNotFound", lambda: client.tag_resources(models.TagResourcesRequest(
    body=models.TagResourcesInput(resource_type="function", resource_id=["sdk-tag-a", "nope"],
                                  tag=[tag("new", "x")]))))
refused("InvalidArgument", lambda: client.tag_resources(models.TagResourcesRequest(
    body=models.TagResourcesInput(resource_type="oss-bucket", resource_id=["sdk-tag-a"],
                                  tag=[tag("new", "x")]))))
refused("InvalidArgument", lambda: client.tag_resources(models.TagResourcesRequest(
    body=models.TagResourcesInput(resource_type="function", resource_id=["sdk-tag-a"],
                                  tag=[tag("k%d" % i, "v") for i in range(20)]))))
listed = client.list_tag_resources(models.ListTagResourcesRequest(
    resource_type="function", resource_id=["sdk-tag-a"])).body
assert [(r.tag_key, r.tag_value) for r in listed.tag_resources] == [("team", "shop")], listed.to_map()
print("SDK tags ok")
