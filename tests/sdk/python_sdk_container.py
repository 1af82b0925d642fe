#!/usr/bin/env python3
"""A custom-container function through the official Python SDK for FC 3.0
(alibabacloud-fc20230330), unmodified:

    python tests/sdk/python_sdk_container.py CREDENTIALS.json IMAGE USER PASSWORD

CreateFunction with runtime custom-container and CustomContainerConfig (image,
port, RegistryConfig.authConfig), GetFunction (the image and user name come
back, the password never does), InvokeFunction (the body comes back in the
test image's answer), DeleteFunction. Exit status 1 on the first failure; the
function is deleted even then.
"""

import json
import sys
import uuid

from alibabacloud_fc20230330 import models as fc
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi import models as openapi


def make_client(cred):
    scheme, sep, hostport = cred["endpoint"].partition("://")
    if not sep:
        scheme, hostport = "https", cred["endpoint"]
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
    cred_path, image, user, password = sys.argv[1:5]
    with open(cred_path) as f:
        cred = json.load(f)
    client = make_client(cred)
    name = "sdk-ctr-" + uuid.uuid4().hex[:8]
    config = fc.CustomContainerConfig(
        image=image,
        port=9000,
        registry_config=fc.RegistryConfig(
            auth_config=fc.RegistryAuthConfig(user_name=user, password=password)),
    )
    created = False
    try:
        client.create_function(fc.CreateFunctionRequest(body=fc.CreateFunctionInput(
            function_name=name, runtime="custom-container", handler="index.handler",
            memory_size=256, custom_container_config=config)))
        created = True
        print(f"ok   CreateFunction {name}")
        got = client.get_function(name, fc.GetFunctionRequest()).body
        ccc = got.custom_container_config
        assert got.runtime == "custom-container", got.runtime
        assert ccc.image == image, ccc.image
        assert ccc.port == 9000, ccc.port
        assert ccc.registry_config.auth_config.user_name == user
        assert not ccc.registry_config.auth_config.password, "the password came back"
        assert password not in json.dumps(got.to_map()), "the password came back"
        print("ok   GetFunction: image, port and user name; no password")
        out = client.invoke_function(name, fc.InvokeFunctionRequest(body=b"from-the-sdk"))
        text = out.body.read().decode() if hasattr(out.body, "read") else str(out.body)
        assert "from-the-sdk" in text, text
        print(f"ok   InvokeFunction: {text[:200]}")
    finally:
        if created:
            client.delete_function(name)
            print("ok   DeleteFunction")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report any failure and exit 1
        print(f"FAIL {type(e).__name__}: {e}")
        sys.exit(1)
