"""A Kiln function on the built-in `python3.11` runtime: FC's event handler
model, no HTTP server of its own.

Deploy:  kiln deploy --name py-hello --runtime python3.11 examples/python-hello
Invoke:  kiln invoke py-hello --data '{"name": "Kiln"}'

The handler answers with what it was given and what its context says; an
event {"fail": "..."} raises, which the caller sees as FC's error body
(errorMessage, errorType, stackTrace) with x-fc-error-type
UnhandledInvocationError. Configure `initialize` as the initializer
(instanceLifecycleConfig.initializer.handler = "index.initialize") and it
runs once per instance, before the first call; `pre_stop` as the PreStop
hook (instanceLifecycleConfig.preStop.handler = "index.pre_stop") runs before
the instance goes away. Through an HTTP trigger the event is FC 3.0's HTTP
trigger event; the path /shaped answers in FC's HTTP response shape.
"""

import json
import logging

initialized = []


def initialize(context):
    initialized.append(context.request_id)
    context.logger.info("initializer ran")


def pre_stop(context):
    context.logger.info("pre-stop ran after %d initializer run(s)", len(initialized))


def handler(event, context):
    data = json.loads(event or b"{}")
    logger = logging.getLogger()
    logger.info("hello from %s", context.function.name)
    if "fail" in data:
        raise ValueError(data["fail"])
    # Through an HTTP trigger the event is FC 3.0's HTTP event; its path
    # /shaped asks for an answer in FC's response shape.
    if data.get("rawPath") == "/shaped":
        return {
            "statusCode": 201,
            "headers": {"x-shaped": "yes", "content-type": "text/plain"},
            "isBase64Encoded": True,
            "body": "c2hhcGVk",  # "shaped"
        }
    creds = context.credentials
    return {
        "event": data,
        "requestId": context.request_id,
        "function": {
            "name": context.function.name,
            "handler": context.function.handler,
            "memory": context.function.memory,
            "timeout": context.function.timeout,
        },
        "region": context.region,
        "accountId": context.account_id,
        "hasCredentials": bool(
            creds.access_key_id and creds.access_key_secret and creds.security_token
        ),
        "initializerRuns": len(initialized),
    }
