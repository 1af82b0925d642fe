"""Drive a Kiln gateway's custom domains with the official FC 2023-03-30
Python SDK, unchanged but for endpoint, keys and CA: CreateCustomDomain,
GetCustomDomain, UpdateCustomDomain, ListCustomDomains, DeleteCustomDomain,
and FC's errors for bad input.
Arguments: endpoint ak sk ca cert-path key-path other-key-path."""
import sys

from alibabacloud_fc20230330 import models
from alibabacloud_fc20230330.client import Client
from alibabacloud_tea_openapi.utils_models import Config
from Tea.exceptions import TeaException

endpoint, ak, sk, ca, cert_path, key_path, other_key_path = sys.argv[1:8]
client = Client(Config(access_key_id=ak, access_key_secret=sk, endpoint=endpoint,
                       protocol="https", ca=ca, region_id="cn-test"))
cert, key, other_key = (open(p).read() for p in (cert_path, key_path, other_key_path))
name = "sdk.example.test"


def refused(code_, f):
    try:
        f()
    except TeaException as e:
        assert e.code == code_, (e.code, e.message)
        return
    raise AssertionError("accepted, expected " + code_)


def routes(*paths):
    return models.RouteConfig(routes=[
        models.PathConfig(path=p, function_name="web", qualifier="LATEST", methods=["GET", "POST"])
        for p in paths])


d = client.create_custom_domain(models.CreateCustomDomainRequest(body=models.CreateCustomDomainInput(
    domain_name=name, protocol="HTTPS",
    cert_config=models.CertConfig(cert_name="sdk", certificate=cert, private_key=key),
    tls_config=models.TLSConfig(min_version="TLSv1.3"),
    route_config=routes("/*", "/api/*")))).body
assert d.domain_name == name and d.protocol == "HTTPS", d.to_map()
assert d.cert_config.certificate == cert and not d.cert_config.private_key, d.to_map()
assert d.tls_config.min_version == "TLSv1.3", d.to_map()
assert [r.path for r in d.route_config.routes] == ["/*", "/api/*"], d.to_map()
assert d.route_config.routes[0].function_name == "web", d.to_map()
assert d.account_id and d.api_version == "2023-03-30" and d.created_time, d.to_map()

refused("DomainNameAlreadyExists", lambda: client.create_custom_domain(
    models.CreateCustomDomainRequest(body=models.CreateCustomDomainInput(
        domain_name=name, protocol="HTTPS",
        cert_config=models.CertConfig(certificate=cert, private_key=key)))))
refused("InvalidArgument", lambda: client.create_custom_domain(
    models.CreateCustomDomainRequest(body=models.CreateCustomDomainInput(
        domain_name="other.example.test", protocol="HTTP"))))
refused("InvalidArgument", lambda: client.create_custom_domain(
    models.CreateCustomDomainRequest(body=models.CreateCustomDomainInput(
        domain_name=name.replace("sdk", "mismatch"), protocol="HTTPS",
        cert_config=models.CertConfig(certificate=cert, private_key=other_key)))))

got = client.get_custom_domain(name).body
assert got.to_map() == d.to_map(), (got.to_map(), d.to_map())
refused("DomainNameNotFound", lambda: client.get_custom_domain("none.example.test"))

u = client.update_custom_domain(name, models.UpdateCustomDomainRequest(
    body=models.UpdateCustomDomainInput(route_config=routes("/v2/*")))).body
assert [r.path for r in u.route_config.routes] == ["/v2/*"], u.to_map()
assert u.cert_config.certificate == cert and u.tls_config.min_version == "TLSv1.3", u.to_map()
refused("InvalidArgument", lambda: client.update_custom_domain(name, models.UpdateCustomDomainRequest(
    body=models.UpdateCustomDomainInput(cert_config=models.CertConfig(certificate=cert, private_key=other_key)))))

listed = client.list_custom_domains(models.ListCustomDomainsRequest(prefix="sdk", limit=10)).body
assert [x.domain_name for x in listed.custom_domains] == [name], listed.to_map()
assert not listed.custom_domains[0].cert_config.private_key, listed.to_map()

client.delete_custom_domain(name)
refused("DomainNameNotFound", lambda: client.delete_custom_domain(name))
listed = client.list_custom_domains(models.ListCustomDomainsRequest()).body
assert not listed.custom_domains, listed.to_map()
print("SDK domains ok")
