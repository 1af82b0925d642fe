"""Drive a Kiln gateway's provision and concurrency configs with the official
FC 2023-03-30 Python SDK, unchanged but for endpoint, keys and CA.
Arguments: endpoint ak sk ca function-name (an existing function)."""
import sys

from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from Tea.exceptions import TeaException

endpoint, ak, sk, ca, name = sys.argv[1:6]
client = Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=endpoint,
                       protocol="https", ca=ca, region_id="cn-test"))

put = client.put_provision_config(name, models.PutProvisionConfigRequest(
    qualifier="LATEST",
    body=models.PutProvisionConfigInput(
        target=2, always_allocate_cpu=True,
        scheduled_actions=[models.ScheduledAction(
            name="night", schedule_expression="cron(0 0 22 * * *)", target=3,
            time_zone="Asia/Shanghai")],
        target_tracking_policies=[models.TargetTrackingPolicy(
            name="tt", metric_type="ProvisionedConcurrencyUtilization", metric_target=0.6,
            min_capacity=1, max_capacity=5)]))).body
assert put.default_target == 2 and put.always_allocate_cpu, put.to_map()
assert put.function_arn.endswith(":functions/" + name), put.function_arn
assert put.scheduled_actions[0].time_zone == "Asia/Shanghai", put.to_map()
assert put.target_tracking_policies[0].max_capacity == 5, put.to_map()

got = client.get_provision_config(name, models.GetProvisionConfigRequest(qualifier="LATEST")).body
assert got.default_target == 2 and got.current == 0, got.to_map()
assert got.scheduled_actions[0].schedule_expression == "cron(0 0 22 * * *)", got.to_map()

listed = client.list_provision_configs(models.ListProvisionConfigsRequest(limit=10)).body
assert [c.function_arn for c in listed.provision_configs] == [put.function_arn], listed.to_map()

try:
    client.put_provision_config(name, models.PutProvisionConfigRequest(
        body=models.PutProvisionConfigInput(target=1, scheduled_actions=[models.ScheduledAction(
            name="bad", schedule_expression="cron(0 0 22 * * *)", target=1, time_zone="Nowhere/Land")])))
    raise AssertionError("bad time zone accepted")
except TeaException as e:
    assert e.code == "InvalidArgument", (e.code, e.message)
assert client.get_provision_config(name, models.GetProvisionConfigRequest()).body.default_target == 2

client.delete_provision_config(name, models.DeleteProvisionConfigRequest(qualifier="LATEST"))
got = client.get_provision_config(name, models.GetProvisionConfigRequest()).body
assert got.default_target == 0 and not got.scheduled_actions, got.to_map()
listed = client.list_provision_configs(models.ListProvisionConfigsRequest()).body
assert not listed.provision_configs, listed.to_map()

try:
    client.get_provision_config("no-such-fn", models.GetProvisionConfigRequest())
    raise AssertionError("missing function answered")
except TeaException as e:
    assert e.code == "FunctionNotFound", (e.code, e.message)

conc = client.put_concurrency_config(name, models.PutConcurrencyConfigRequest(
    body=models.PutConcurrencyInput(reserved_concurrency=3))).body
assert conc.reserved_concurrency == 3, conc.to_map()
assert client.get_concurrency_config(name).body.reserved_concurrency == 3
client.delete_concurrency_config(name)
assert client.get_concurrency_config(name).body.reserved_concurrency is None
# An alias's own provision configuration (FC takes LATEST or an alias).
client.publish_function_version(name, models.PublishFunctionVersionRequest(
    body=models.PublishVersionInput(description="v1")))
client.create_alias(name, models.CreateAliasRequest(body=models.CreateAliasInput(
    alias_name="live", version_id="1")))
put = client.put_provision_config(name, models.PutProvisionConfigRequest(
    qualifier="live", body=models.PutProvisionConfigInput(target=1))).body
assert put.default_target == 1 and put.function_arn.endswith("/aliases/live"), put.to_map()
got = client.get_provision_config(name, models.GetProvisionConfigRequest(qualifier="live")).body
assert got.default_target == 1, got.to_map()
try:
    client.put_provision_config(name, models.PutProvisionConfigRequest(
        qualifier="1", body=models.PutProvisionConfigInput(target=1)))
    raise AssertionError("a version's provision config was accepted")
except TeaException as e:
    assert e.code == "InvalidArgument", (e.code, e.message)
client.delete_provision_config(name, models.DeleteProvisionConfigRequest(qualifier="live"))
assert client.get_provision_config(
    name, models.GetProvisionConfigRequest(qualifier="live")).body.default_target == 0
client.delete_alias(name, "live")
client.delete_function_version(name, "1")
print("SDK provision ok")
