"""Drive a Kiln gateway's triggers with the official FC 2023-03-30 Python
SDK, unchanged but for endpoint, keys and CA: CreateTrigger, GetTrigger,
UpdateTrigger, ListTriggers, DeleteTrigger, and FC's errors for bad input.
Arguments: endpoint ak sk ca zip-path."""
import base64
import json
import sys

from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from Tea.exceptions import TeaException

endpoint, ak, sk, ca, zip_path = sys.argv[1:6]
client = Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=endpoint,
                       protocol="https", ca=ca, region_id="cn-test"))
name = "sdk-trig"


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
    code=models.InputCodeLocation(
        zip_file=base64.b64encode(open(zip_path, "rb").read()).decode()))))

http_config = json.dumps({"methods": ["GET", "POST"], "authType": "anonymous"})
t = client.create_trigger(name, models.CreateTriggerRequest(body=models.CreateTriggerInput(
    trigger_name="web", trigger_type="http", trigger_config=http_config,
    description="site"))).body
assert t.trigger_name == "web" and t.trigger_type == "http", t.to_map()
assert t.trigger_config == http_config and t.qualifier == "LATEST", t.to_map()
assert t.http_trigger.url_internet.startswith("https://sdk-trig-"), t.to_map()
assert ".fcapp.localhost" in t.http_trigger.url_internet, t.to_map()
assert t.trigger_id and t.created_time and t.last_modified_time, t.to_map()

timer_config = json.dumps({"cronExpression": "@every 5m", "payload": "tick", "enable": True})
client.create_trigger(name, models.CreateTriggerRequest(body=models.CreateTriggerInput(
    trigger_name="every5", trigger_type="timer", trigger_config=timer_config)))

refused("TriggerAlreadyExists", lambda: client.create_trigger(name, models.CreateTriggerRequest(
    body=models.CreateTriggerInput(trigger_name="web", trigger_type="timer",
                                   trigger_config=timer_config))))
refused("InvalidArgument", lambda: client.create_trigger(name, models.CreateTriggerRequest(
    body=models.CreateTriggerInput(trigger_name="o", trigger_type="oss",
                                   trigger_config=json.dumps({"events": ["oss:ObjectCreated:*"]})))))
refused("InvalidArgument", lambda: client.create_trigger(name, models.CreateTriggerRequest(
    body=models.CreateTriggerInput(trigger_name="b", trigger_type="timer",
                                   trigger_config="{not json"))))
refused("FunctionNotFound", lambda: client.create_trigger("nope", models.CreateTriggerRequest(
    body=models.CreateTriggerInput(trigger_name="w", trigger_type="http",
                                   trigger_config=http_config))))

got = client.get_trigger(name, "web").body
assert got.to_map() == t.to_map(), (got.to_map(), t.to_map())
refused("TriggerNotFound", lambda: client.get_trigger(name, "none"))

listed = client.list_triggers(name, models.ListTriggersRequest(limit=1)).body
assert [x.trigger_name for x in listed.triggers] == ["every5"] and listed.next_token, listed.to_map()
rest = client.list_triggers(name, models.ListTriggersRequest(
    limit=1, next_token=listed.next_token)).body
assert [x.trigger_name for x in rest.triggers] == ["web"] and not rest.next_token, rest.to_map()
pref = client.list_triggers(name, models.ListTriggersRequest(prefix="we")).body
assert [x.trigger_name for x in pref.triggers] == ["web"], pref.to_map()

new_config = json.dumps({"methods": ["GET"], "authType": "function"})
u = client.update_trigger(name, "web", models.UpdateTriggerRequest(body=models.UpdateTriggerInput(
    trigger_config=new_config, description="signed now"))).body
assert u.trigger_config == new_config and u.description == "signed now", u.to_map()
assert u.http_trigger.url_internet == t.http_trigger.url_internet, u.to_map()

refused("InvalidArgument", lambda: client.delete_function(name))
client.delete_trigger(name, "web")
client.delete_trigger(name, "every5")
refused("TriggerNotFound", lambda: client.delete_trigger(name, "web"))
client.delete_function(name)
print("SDK triggers ok")
