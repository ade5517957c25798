"""A minimal gRPC-over-HTTP/2 client on a raw unix socket, standard library only, for the agent
attack tests (tests/attack_agent.rs): it can make a Workload API call on a socket inherited
across exec() or fork(), which no gRPC library allows.

Usage:
  raw_grpc.py call SOCK             connect, FetchX509SVID, print the result
  raw_grpc.py call-fd FD            FetchX509SVID on an inherited, already accepted socket
  raw_grpc.py exec SOCK PROG ARG..  connect, wait until the agent accepted (its SETTINGS
                                    frame arrived), then exec PROG ARG.. --fd N (same pid)
  raw_grpc.py fork-exec SOCK PROG ARG..
                                    connect, wait for the accept, fork: the parent execs
                                    PROG ARG.. (same pid, a registered binary), the child
                                    (still this program) makes the call on the shared socket
  raw_grpc.py idle SOCK             connect, wait for the accept, then report when the agent
                                    closes the connection ("CLOSED <seconds>")
  raw_grpc.py stream-idle SOCK SECS open a FetchX509SVID stream, then report whether the
                                    agent kept it open for SECS more seconds
  raw_grpc.py mutate-call SOCK ACTION EXE
                                    change this program's own executable file EXE (ACTION:
                                    delete, replace = delete and put a new file there, rename),
                                    then connect and FetchX509SVID
  raw_grpc.py stream-then-exec SOCK PROG ARG..
                                    open a FetchX509SVID stream, read the first SVID, then
                                    exec PROG ARG.. N, keeping the stream on socket N
  raw_grpc.py stream-continue SECS FD
                                    read the stream on FD for SECS: "UPDATE" (a new message),
                                    "ENDED" (the agent ended it) or "NOTHING"
  raw_grpc.py flood SOCK N          open N connections (no request), print "OPEN <n>", hold
                                    them until stdin closes

Results: "SVID <spiffe-id>" (the agent sent an X509SVIDResponse), "DENIED" (the call ended
without a message: PERMISSION_DENIED or another error), "CLOSED" (the connection was closed).
"""
import os
import re
import socket
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST, SETTINGS, PING, GOAWAY = 0, 1, 3, 4, 6, 7
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4


def frame(typ, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([typ, flags]) + stream.to_bytes(4, "big") + payload


def read_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def read_frame(sock):
    head = read_exact(sock, 9)
    length = int.from_bytes(head[:3], "big")
    return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, read_exact(sock, length)


def literal(name, value):
    # HPACK literal header field without indexing, new name, no Huffman (lengths < 127).
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def wait_accepted(sock):
    """The agent's HTTP/2 server sends its SETTINGS as soon as it accepted the connection."""
    sock.settimeout(10)
    typ, _, _, _ = read_frame(sock)
    assert typ == SETTINGS, typ
    sock.settimeout(None)


def fetch_x509(sock, settings_seen=False, keep_open=None):
    sock.settimeout(20)
    sock.sendall(PREFACE + frame(SETTINGS, 0, 0))
    if settings_seen:
        sock.sendall(frame(SETTINGS, ACK, 0))
    headers = b"".join(literal(k, v) for k, v in [
        (":method", "POST"), (":scheme", "http"), (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers"),
        ("workload.spiffe.io", "true")])
    sock.sendall(frame(HEADERS, END_HEADERS, 1, headers))
    sock.sendall(frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00"))
    data = b""
    try:
        while True:
            typ, flags, sid, payload = read_frame(sock)
            if typ == SETTINGS and not flags & ACK:
                sock.sendall(frame(SETTINGS, ACK, 0))
            elif typ == PING and not flags & ACK:
                sock.sendall(frame(PING, ACK, 0, payload))
            elif typ == DATA and sid == 1:
                data += payload
                if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[1:5], "big"):
                    break
            elif (typ == HEADERS and sid == 1 and flags & END_STREAM) or (typ == RST and sid == 1) \
                    or typ == GOAWAY:
                break
    except EOFError:
        if not data:
            return "CLOSED"
    m = re.search(rb"spiffe://[A-Za-z0-9._/-]+", data)
    if not m:
        return "DENIED"
    if keep_open is not None:
        # The stream is long-lived: is it still open after keep_open seconds?
        sock.settimeout(keep_open)
        try:
            while True:
                typ, flags, sid, _ = read_frame(sock)
                if (typ == HEADERS and flags & END_STREAM) or typ in (RST, GOAWAY):
                    return "STREAM-ENDED"
        except socket.timeout:
            return "STREAM-OPEN"
        except EOFError:
            return "STREAM-CLOSED"
    return "SVID " + m.group(0).decode()


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def main():
    mode = sys.argv[1]
    if mode == "call":
        print(fetch_x509(connect(sys.argv[2])), flush=True)
    elif mode == "call-fd":
        s = socket.socket(fileno=int(sys.argv[2]))
        print(fetch_x509(s, settings_seen=True), flush=True)
    elif mode == "exec":
        s = connect(sys.argv[2])
        wait_accepted(s)
        os.set_inheritable(s.fileno(), True)
        prog = sys.argv[3]
        os.execv(prog, [prog] + sys.argv[4:] + [str(s.fileno())])
    elif mode == "fork-exec":
        s = connect(sys.argv[2])
        wait_accepted(s)
        os.set_inheritable(s.fileno(), True)
        if os.fork() == 0:
            time.sleep(1.0)  # let the parent exec the registered binary
            print(fetch_x509(s, settings_seen=True), flush=True)
            os._exit(0)
        prog = sys.argv[3]
        os.execv(prog, [prog] + sys.argv[4:])
    elif mode == "idle":
        s = connect(sys.argv[2])
        wait_accepted(s)
        start = time.monotonic()
        s.settimeout(60)
        try:
            while s.recv(4096):
                pass
            print("CLOSED %.1f" % (time.monotonic() - start), flush=True)
        except socket.timeout:
            print("OPEN", flush=True)
    elif mode == "stream-idle":
        print(fetch_x509(connect(sys.argv[2]), keep_open=float(sys.argv[3])), flush=True)
    elif mode == "mutate-call":
        action, exe = sys.argv[3], sys.argv[4]
        if action == "delete":
            os.unlink(exe)
        elif action == "replace":
            os.unlink(exe)
            with open("/usr/bin/python3.11", "rb") as src, open(exe, "wb") as dst:
                dst.write(src.read())
            os.chmod(exe, 0o755)
        elif action == "rename":
            os.rename(exe, exe + ".old")
        else:
            sys.exit("unknown action " + action)
        print(fetch_x509(connect(sys.argv[2])), flush=True)
    elif mode == "stream-then-exec":
        s = connect(sys.argv[2])
        first = fetch_x509(s)
        assert first.startswith("SVID"), first
        os.set_inheritable(s.fileno(), True)
        prog = sys.argv[3]
        os.execv(prog, [prog] + sys.argv[4:] + [str(s.fileno())])
    elif mode == "stream-continue":
        s = socket.socket(fileno=int(sys.argv[3]))
        s.settimeout(float(sys.argv[2]))
        try:
            while True:
                typ, flags, sid, payload = read_frame(s)
                if typ == PING and not flags & ACK:
                    s.sendall(frame(PING, ACK, 0, payload))
                elif typ == DATA and sid == 1 and payload:
                    print("UPDATE", flush=True)
                    break
                elif (typ == HEADERS and sid == 1 and flags & END_STREAM) or typ in (RST, GOAWAY):
                    print("ENDED", flush=True)
                    break
        except socket.timeout:
            print("NOTHING", flush=True)
        except EOFError:
            print("ENDED", flush=True)
    elif mode == "flood":
        conns = []
        for _ in range(int(sys.argv[3])):
            try:
                conns.append(connect(sys.argv[2]))
            except OSError as e:
                print("connect failed:", e, file=sys.stderr)
                break
        print("OPEN %d" % len(conns), flush=True)
        sys.stdin.read()
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
