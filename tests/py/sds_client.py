"""Envoy SDS client built from the published Envoy protos (PyPI xds-protos + grpcio), driven by
tests/sds_envoy.rs against a running `svidcar agent`.

Usage: sds_client.py /path/to/agent.sock SPIFFE_ID TIMEOUT_SECONDS

Checks, in order (prints one line per step, "done" at the end, exits non-zero on failure):
1. StreamSecrets [default, ROOTCA, ALL]: the default SVID (PEM chain + matching PEM key, URI SAN
   = SPIFFE_ID) verifies against ROOTCA; ALL is Envoy's SPIFFE validator config with our domain.
2. ACK, then the next push is a rotation: new version_info, new nonce, new certificate.
3. NACK that version: it is not resent; the next push (next rotation) has another version.
4. FetchSecrets with no names: every SVID by ID plus our bundle by trust domain ID.
5. A SPIFFE ID the caller has no entry for: PERMISSION_DENIED. DeltaSecrets: UNIMPLEMENTED.
"""
import queue
import sys
import threading
import time

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2 as spiffe_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
sock, want_id, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
trust_domain = want_id.split("/")[2]
NODE = base_pb2.Node(id="sds-test", cluster="svidcar-tests")


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def secrets_of(resp):
    out = {}
    for any_msg in resp.resources:
        s = secret_pb2.Secret()
        if not any_msg.Unpack(s):
            fail("resource is not a Secret: " + any_msg.type_url)
        out[s.name] = s
    return out


def check_tls(secret):
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    key = serialization.load_pem_private_key(secret.tls_certificate.private_key.inline_bytes, None)
    leaf = chain[0]
    if key.public_key().public_numbers() != leaf.public_key().public_numbers():
        fail("private key does not match the certificate")
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [want_id]:
        fail(f"URI SANs {uris}, expected [{want_id}]")
    return leaf


def verifies(leaf, roots_pem):
    for root in x509.load_pem_x509_certificates(roots_pem):
        try:
            root.public_key().verify(
                leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm)
            )
            return True
        except Exception:
            continue
    return False


class Stream:
    def __init__(self, stub, names):
        self.names = names
        self.requests = queue.Queue()
        self.responses = queue.Queue()
        self.call = stub.StreamSecrets(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()
        self.send()

    def _read(self):
        try:
            for r in self.call:
                self.responses.put(r)
        except grpc.RpcError as e:
            self.responses.put(e)

    def send(self, version="", nonce="", error=None):
        self.requests.put(discovery_pb2.DiscoveryRequest(
            version_info=version, node=NODE, resource_names=self.names, type_url=SECRET,
            response_nonce=nonce, error_detail=error))

    def next(self, wait):
        try:
            r = self.responses.get(timeout=wait)
        except queue.Empty:
            return None
        if isinstance(r, grpc.RpcError):
            raise r
        return r

    def close(self):
        self.requests.put(None)
        self.call.cancel()


channel = grpc.insecure_channel("unix:" + sock)
grpc.channel_ready_future(channel).result(timeout=timeout)
stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)

# 1. default, ROOTCA, ALL.
st = Stream(stub, ["default", "ROOTCA", "ALL"])
r1 = st.next(timeout) or fail("no first response")
if r1.type_url != SECRET or not r1.version_info or not r1.nonce:
    fail(f"bad response header: {r1.type_url!r} {r1.version_info!r} {r1.nonce!r}")
s1 = secrets_of(r1)
if sorted(s1) != ["ALL", "ROOTCA", "default"]:
    fail(f"names {sorted(s1)}")
leaf1 = check_tls(s1["default"])
roots = s1["ROOTCA"].validation_context.trusted_ca.inline_bytes
if not verifies(leaf1, roots):
    fail("default SVID does not verify against ROOTCA")
cvc = s1["ALL"].validation_context.custom_validator_config
if cvc.name != "envoy.tls.cert_validator.spiffe":
    fail("ALL validator name " + cvc.name)
spiffe_cfg = spiffe_pb2.SPIFFECertValidatorConfig()
if not cvc.typed_config.Unpack(spiffe_cfg):
    fail("ALL typed_config is not SPIFFECertValidatorConfig: " + cvc.typed_config.type_url)
tds = {t.name: t.trust_bundle.inline_bytes for t in spiffe_cfg.trust_domains}
if trust_domain not in tds or not verifies(leaf1, tds[trust_domain]):
    fail(f"ALL lacks a usable bundle for {trust_domain}: {sorted(tds)}")
print(f"step1 ok version={r1.version_info} serial={leaf1.serial_number:x} tds={sorted(tds)}", flush=True)

# 2. ACK; the next push is a rotation.
st.send(r1.version_info, r1.nonce)
r2 = st.next(timeout) or fail("no rotation pushed")
if r2.version_info == r1.version_info or r2.nonce == r1.nonce:
    fail("rotation reused version or nonce (resend after ACK?)")
leaf2 = check_tls(secrets_of(r2)["default"])
if leaf2.serial_number == leaf1.serial_number:
    fail("rotation pushed the same certificate")
print(f"step2 ok version={r2.version_info} serial={leaf2.serial_number:x}", flush=True)

# 3. NACK r2: not resent; the next push is a new version.
st.send(r1.version_info, r2.nonce, status_pb2.Status(code=3, message="test NACK"))
r3 = st.next(timeout) or fail("nothing pushed after NACK")
if r3.version_info in (r1.version_info, r2.version_info):
    fail(f"NACKed/old version resent: {r3.version_info}")
st.send(r3.version_info, r3.nonce)
print(f"step3 ok version={r3.version_info}", flush=True)
st.close()

# 4. FetchSecrets, no names: everything.
everything = secrets_of(stub.FetchSecrets(discovery_pb2.DiscoveryRequest(node=NODE, type_url=SECRET)))
if want_id not in everything or f"spiffe://{trust_domain}" not in everything:
    fail(f"fetch-all names {sorted(everything)}")
check_tls(everything[want_id])
print(f"step4 ok names={sorted(everything)}", flush=True)

# 5. Refusals.
bad = Stream(stub, [f"spiffe://{trust_domain}/not-mine"])
try:
    got = bad.next(timeout)
    fail(f"expected PERMISSION_DENIED, got {got}")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.PERMISSION_DENIED:
        fail(f"expected PERMISSION_DENIED, got {e.code()}: {e.details()}")
    print(f"step5 ok refused: {e.details()}", flush=True)
try:
    list(stub.DeltaSecrets(iter([discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=SECRET)])))
    fail("DeltaSecrets answered")
except grpc.RpcError as e:
    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
        fail(f"DeltaSecrets: {e.code()}")
print("done", flush=True)
