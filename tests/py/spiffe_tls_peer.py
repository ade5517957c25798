"""py-spiffe's `spiffe-tls` apps as peers of svidcar (tests/interop_peers.rs).

  spiffe_tls_peer.py client unix:///agent.sock HOST:PORT ALPN[,ALPN...]|none EXPECT_ID PATH
      mTLS to HOST:PORT offering ALPN (`none`: no ALPN extension); the server must present
      EXPECT_ID. Prints one JSON line (negotiated ALPN, TLS version, server ID), then sends
      `GET PATH` as HTTP/1.1 and prints what came back. Exits non-zero on a failed handshake.
  spiffe_tls_peer.py server unix:///agent.sock HOST:PORT EXPECT_ID
      spiffetls.listen (mTLS) on HOST:PORT; only EXPECT_ID may connect. Answers each request
      with `spiffe-tls server saw <client ID> over <TLS version>`. Prints `listening`.
"""
import json
import socket
import sys
import threading

from cryptography import x509 as cx509
from OpenSSL import SSL
from spiffe import X509Source
from spiffetls import ListenOptions, ServerTlsMode, create_ssl_context, listen


def uri_san(cert):
    c = cert.to_cryptography() if hasattr(cert, "to_cryptography") else cert
    ext = c.extensions.get_extension_for_class(cx509.SubjectAlternativeName)
    uris = ext.value.get_values_for_type(cx509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else None


def is_peer(expect):
    def check(cert):
        got = uri_san(cert)
        if got != expect:
            print(f"peer is {got}, not {expect}", file=sys.stderr, flush=True)
        return got == expect

    return check


def read_all(conn):
    out = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            break
        if not chunk:
            break
        out += chunk
    return out


def client(endpoint, addr, alpn, expect, path):
    source = X509Source(socket_path=endpoint, timeout_in_seconds=10)
    ctx = create_ssl_context(
        SSL.TLS_CLIENT_METHOD, source, is_peer(expect), SSL.VERIFY_PEER
    )
    if alpn != "none":
        ctx.set_alpn_protos([p.encode() for p in alpn.split(",")])
    host, port = addr.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket (a timeout reads as WantRead)
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    try:
        conn.do_handshake()
    except SSL.Error as e:
        print(json.dumps({"handshake": "failed", "error": repr(e)}), flush=True)
        sys.exit(2)
    facts = {
        "handshake": "ok",
        "alpn": (conn.get_alpn_proto_negotiated() or b"").decode(),
        "version": conn.get_protocol_version_name(),
        "server_id": uri_san(conn.get_peer_certificate()),
    }
    print(json.dumps(facts), flush=True)
    conn.sendall(f"GET {path} HTTP/1.1\r\nHost: spiffe-tls\r\nConnection: close\r\n\r\n".encode())
    sys.stdout.write(read_all(conn).decode(errors="replace"))
    source.close()


def serve_one(conn):
    try:
        conn.do_handshake()
        peer = uri_san(conn.get_peer_certificate())
        req = b""
        while b"\r\n\r\n" not in req:
            chunk = conn.recv(65536)
            if not chunk:
                return
            req += chunk
        body = f"spiffe-tls server saw {peer} over {conn.get_protocol_version_name()}\n"
        conn.sendall(
            (
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        conn.shutdown()
    except SSL.Error as e:
        print(f"refused a client: {e}", flush=True)
    finally:
        conn.close()


def server(endpoint, addr, expect):
    source = X509Source(socket_path=endpoint, timeout_in_seconds=10)
    opts = ListenOptions(
        tls_mode=ServerTlsMode.MTLS, authorize_fn=is_peer(expect)
    )
    listener = listen(addr, source, opts)
    print("listening", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "client":
        client(*rest)
    elif mode == "server":
        server(*rest)
    else:
        sys.exit(f"unknown mode {mode}")
