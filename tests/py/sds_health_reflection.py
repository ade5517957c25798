"""gRPC health and server reflection on the agent socket, from the standard Python clients
(grpcio-health-checking, grpcio-reflection); driven by tests/sds_envoy.rs.

Usage: sds_health_reflection.py /path/to/agent.sock
Checks: Health.Check("") and Check("envoy.service.secret.v3.SecretDiscoveryService") are
SERVING, an unknown service is NOT_FOUND, Watch streams SERVING; reflection lists the Workload
API, SDS and health services and resolves SDS, the Envoy Secret message and a Workload API
message into descriptors. Prints "done" on success.
"""
import sys

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


channel = grpc.insecure_channel("unix:" + sys.argv[1])
grpc.channel_ready_future(channel).result(timeout=10)

health = health_pb2_grpc.HealthStub(channel)
for svc in ["", "envoy.service.secret.v3.SecretDiscoveryService", "SpiffeWorkloadAPI"]:
    r = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
    if r.status != health_pb2.HealthCheckResponse.SERVING:
        fail(f"health {svc!r}: {r.status}")
try:
    health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    fail("unknown service answered")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.NOT_FOUND:
        fail(f"unknown service: {e.code()}")
watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
first = next(watch)
if first.status != health_pb2.HealthCheckResponse.SERVING:
    fail(f"watch: {first.status}")
watch.cancel()
print("health ok", flush=True)

db = ProtoReflectionDescriptorDatabase(channel)
services = set(db.get_services())
for want in ["SpiffeWorkloadAPI", "envoy.service.secret.v3.SecretDiscoveryService", "grpc.health.v1.Health"]:
    if want not in services:
        fail(f"reflection does not list {want}: {sorted(services)}")
pool = DescriptorPool(db)
sds = pool.FindServiceByName("envoy.service.secret.v3.SecretDiscoveryService")
if sorted(m.name for m in sds.methods) != ["DeltaSecrets", "FetchSecrets", "StreamSecrets"]:
    fail("SDS methods " + str([m.name for m in sds.methods]))
secret = pool.FindMessageTypeByName("envoy.extensions.transport_sockets.tls.v3.Secret")
if secret.fields_by_name["validation_context"].number != 4:
    fail("Secret.validation_context number")
x509 = pool.FindMessageTypeByName("X509SVIDResponse")
if x509.fields_by_name["federated_bundles"].number != 3:
    fail("X509SVIDResponse.federated_bundles number")
print(f"reflection ok services={sorted(services)}", flush=True)

# Our Envoy subset must be byte-compatible with the published protos: every field we define has
# the upstream number, type and cardinality (upstream has more fields; we define a subset).
from envoy.config.core.v3 import base_pb2, extension_pb2  # noqa: E402
from envoy.extensions.transport_sockets.tls.v3 import common_pb2  # noqa: E402
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as sv  # noqa: E402
from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2 as upstream_secret  # noqa: E402
from google.rpc import status_pb2  # noqa: E402

upstream = [
    discovery_pb2.DiscoveryRequest, discovery_pb2.DiscoveryResponse,
    discovery_pb2.DeltaDiscoveryRequest, discovery_pb2.DeltaDiscoveryResponse,
    discovery_pb2.Resource, base_pb2.Node, base_pb2.DataSource, extension_pb2.TypedExtensionConfig,
    upstream_secret.Secret, common_pb2.TlsCertificate, common_pb2.CertificateValidationContext,
    sv.SPIFFECertValidatorConfig, sv.SPIFFECertValidatorConfig.TrustDomain, status_pb2.Status,
]
checked = 0
for up in upstream:
    ours = pool.FindMessageTypeByName(up.DESCRIPTOR.full_name)
    for f in ours.fields:
        u = up.DESCRIPTOR.fields_by_name.get(f.name)
        if u is None:
            fail(f"{ours.full_name}.{f.name} does not exist upstream")
        same = (u.number, u.type, u.is_repeated) == (f.number, f.type, f.is_repeated)
        if f.message_type is not None:
            same = same and u.message_type.full_name == f.message_type.full_name
        if not same:
            fail(f"{ours.full_name}.{f.name}: ours {(f.number, f.type)} upstream {(u.number, u.type)}")
        checked += 1
print(f"envoy subset ok fields={checked}", flush=True)
print("done", flush=True)
