"""py-spiffe driver for tests/agent_py.rs: one-shot Workload API calls against svidcar.

Usage: spiffe_fetch.py unix:///path/to/agent.sock TRUST_DOMAIN
Prints one JSON object with what py-spiffe saw; exits non-zero on any unexpected result.
"""
import json
import sys

from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient
from spiffe.spiffe_id.spiffe_id import TrustDomain

endpoint, td_name = sys.argv[1], sys.argv[2]
out = {}
with WorkloadApiClient(socket_path=endpoint, default_timeout=10) as client:
    svid = client.fetch_x509_svid()
    out["x509_id"] = str(svid.spiffe_id)
    out["x509_chain_len"] = len(svid.cert_chain)
    out["x509_not_after"] = svid.leaf.not_valid_after_utc.timestamp()
    out["x509_leaf_pem"] = svid.leaf.public_bytes(serialization.Encoding.PEM).decode()

    ctx = client.fetch_x509_context()
    out["context_svids"] = [str(s.spiffe_id) for s in ctx.x509_svids]

    bundles = client.fetch_x509_bundles()
    td = TrustDomain(td_name)
    bundle = bundles.get_bundle_for_trust_domain(td)
    assert bundle is not None, "no X.509 bundle for our trust domain"
    out["x509_authorities"] = len(bundle.x509_authorities)
    out["bundle_tds"] = sorted(str(b.trust_domain) for b in bundles.bundles)

    jwt = client.fetch_jwt_svid(audience={"svidcar-test"})
    out["jwt_id"] = str(jwt.spiffe_id)
    out["jwt_aud"] = sorted(jwt.audience)

    validated = client.validate_jwt_svid(jwt.token, "svidcar-test")
    out["validated_id"] = str(validated.spiffe_id)

    try:
        client.validate_jwt_svid(jwt.token, "someone-else")
        out["wrong_audience"] = "accepted"
    except Exception as e:  # ValidateJwtSvidError
        out["wrong_audience"] = "rejected: " + type(e).__name__ + ": " + str(e)

    jwt_bundles = client.fetch_jwt_bundles()
    jb = jwt_bundles.get_bundle_for_trust_domain(td)
    assert jb is not None, "no JWT bundle for our trust domain"
    out["jwt_authorities"] = len(jb.jwt_authorities)
    # Verify the token locally against the fetched JWT bundle (independent of the agent).
    from spiffe.svid.jwt_svid import JwtSvid
    local = JwtSvid.parse_and_validate(jwt.token, jb, {"svidcar-test"})
    out["local_validated_id"] = str(local.spiffe_id)

print(json.dumps(out))
