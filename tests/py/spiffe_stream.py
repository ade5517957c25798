"""py-spiffe driver for tests/agent_py.rs: watch X.509 contexts through rotations.

Usage: spiffe_stream.py unix:///path/to/agent.sock ROTATIONS TIMEOUT_SECONDS
Prints one JSON line per received context: serial, not_before, not_after, received_at, and the
bundle's authorities count; then "done". Exits non-zero on error or timeout.
"""
import json
import sys
import threading
import time

from spiffe import WorkloadApiClient

endpoint, rotations, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
done = threading.Event()
errors = []
seen = []


def on_success(ctx):
    svid = ctx.default_svid
    leaf = svid.leaf
    bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    rec = {
        "id": str(svid.spiffe_id),
        "serial": format(leaf.serial_number, "x"),
        "not_before": leaf.not_valid_before_utc.timestamp(),
        "not_after": leaf.not_valid_after_utc.timestamp(),
        "received_at": time.time(),
        "authorities": len(bundle.x509_authorities) if bundle else 0,
    }
    seen.append(rec)
    print(json.dumps(rec), flush=True)
    if len({r["serial"] for r in seen}) > rotations:
        done.set()


def on_error(e):
    errors.append(repr(e))
    done.set()


client = WorkloadApiClient(socket_path=endpoint)
handle = client.stream_x509_contexts(on_success, on_error, retry_connect=False)
ok = done.wait(timeout)
handle.cancel()
client.close()
if errors:
    print("error: " + "; ".join(errors), file=sys.stderr)
    sys.exit(2)
if not ok:
    print("timeout after %d contexts" % len(seen), file=sys.stderr)
    sys.exit(3)
print("done", flush=True)
