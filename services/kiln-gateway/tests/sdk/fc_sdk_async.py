"""Drive Kiln's async invocation, async invoke config and async task calls
with the official FC 2023-03-30 Python SDK, unchanged but for endpoint, keys
and CA. Arguments: endpoint ak sk ca zip-path."""
import base64
import sys
import time

from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from darabonba.runtime import RuntimeOptions
from Tea.exceptions import TeaException

endpoint, ak, sk, ca, zip_path = sys.argv[1:6]
client = Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=endpoint,
                       protocol="https", ca=ca, region_id="cn-test"))
code = base64.b64encode(open(zip_path, "rb").read()).decode()


def fc_error(code, call):
    try:
        call()
    except TeaException as e:
        assert e.code == code, (e.code, e.message)
        return
    raise AssertionError(f"expected {code}")


client.create_function(models.CreateFunctionRequest(body=models.CreateFunctionInput(
    function_name="sdk-async", runtime="custom.debian12", handler="index.handler",
    memory_size=512, timeout=5,
    custom_runtime_config=models.CustomRuntimeConfig(command=["python3", "/code/app.py"], port=9000),
    code=models.InputCodeLocation(zip_file=code))))

fc_error("AsyncConfigNotExists", lambda: client.get_async_invoke_config(
    "sdk-async", models.GetAsyncInvokeConfigRequest()))
fc_error("InvalidArgument", lambda: client.put_async_invoke_config(
    "sdk-async", models.PutAsyncInvokeConfigRequest(body=models.PutAsyncInvokeConfigInput(
        max_async_retry_attempts=100))))
put = client.put_async_invoke_config("sdk-async", models.PutAsyncInvokeConfigRequest(
    body=models.PutAsyncInvokeConfigInput(async_task=True, max_async_retry_attempts=2,
                                          max_async_event_age_in_seconds=600))).body
assert put.async_task is True and put.max_async_retry_attempts == 2, put.to_map()
got = client.get_async_invoke_config("sdk-async", models.GetAsyncInvokeConfigRequest()).body
assert got.max_async_event_age_in_seconds == 600 and got.function_arn.endswith(":functions/sdk-async"), got.to_map()
listed = client.list_async_invoke_configs(models.ListAsyncInvokeConfigsRequest(function_name="sdk-async")).body
assert [c.function_arn for c in listed.configs] == [got.function_arn], listed.to_map()

inv = client.invoke_function_with_options(
    "sdk-async", models.InvokeFunctionRequest(body=b"async from sdk"),
    models.InvokeFunctionHeaders(x_fc_invocation_type="Async", x_fc_async_task_id="sdk-task-1"),
    RuntimeOptions())
assert inv.status_code == 202, inv.status_code
assert inv.headers.get("x-fc-request-id"), inv.headers

for _ in range(100):
    task = client.get_async_task("sdk-async", "sdk-task-1", models.GetAsyncTaskRequest()).body
    if task.status == "Succeeded":
        break
    time.sleep(0.1)
assert task.status == "Succeeded", task.to_map()
assert task.request_id == inv.headers["x-fc-request-id"], task.to_map()
assert [e.status for e in task.events] == ["Enqueued", "Running", "Succeeded"], task.to_map()

tasks = client.list_async_tasks("sdk-async", models.ListAsyncTasksRequest(
    prefix="sdk-", status="Succeeded", limit=10, sort_order_by_time="desc", include_payload=True)).body
assert [t.task_id for t in tasks.tasks] == ["sdk-task-1"], tasks.to_map()
assert tasks.tasks[0].task_payload == "async from sdk", tasks.to_map()

fc_error("InvalidArgument", lambda: client.stop_async_task(
    "sdk-async", "sdk-task-1", models.StopAsyncTaskRequest()))
fc_error("AsyncTaskNotFound", lambda: client.stop_async_task(
    "sdk-async", "no-such-task", models.StopAsyncTaskRequest()))
fc_error("AsyncTaskNotFound", lambda: client.get_async_task(
    "sdk-async", "no-such-task", models.GetAsyncTaskRequest()))

client.delete_async_invoke_config("sdk-async", models.DeleteAsyncInvokeConfigRequest())
fc_error("AsyncConfigNotExists", lambda: client.get_async_invoke_config(
    "sdk-async", models.GetAsyncInvokeConfigRequest()))
# Without task mode the invocations are not tasks (FC records none).
fc_error("AsyncTaskNotFound", lambda: client.get_async_task(
    "sdk-async", "sdk-task-1", models.GetAsyncTaskRequest()))
untracked = client.list_async_tasks("sdk-async", models.ListAsyncTasksRequest()).body
assert not untracked.tasks, untracked.to_map()
print("SDK async ok")
