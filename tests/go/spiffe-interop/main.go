// spiffe-interop: a go-spiffe v2 workload that talks to svidcar (tests/interop_go.rs).
//
// The Workload API address comes from SPIFFE_ENDPOINT_SOCKET (go-spiffe's default), so every
// call below is the plain go-spiffe API a real application would use.
//
//	spiffe-interop x509 [-updates N]           X509Source: print each SVID (id, serial, key),
//	                                           verified with x509svid.Verify against the bundle
//	spiffe-interop jwt -audience A             FetchJWTSVID, then jwtsvid.ParseAndValidate with a
//	                                           JWTSource (and once with a wrong audience)
//	spiffe-interop serve -addr A -authorize ID spiffetls.Listen(AuthorizeID(ID)); answers each
//	                                           line with "go-spiffe server saw <peer ID>: <line>"
//	spiffe-interop dial -addr A -authorize ID -msg M
//	                                           spiffetls.Dial(AuthorizeID(ID)), send M, print
//	                                           the verified server ID and the reply
//
// Output is one JSON object per line on stdout; errors go to stderr with exit status 1.
package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

func emit(v map[string]any) {
	b, err := json.Marshal(v)
	if err != nil {
		fail("json: %v", err)
	}
	fmt.Println(string(b))
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "spiffe-interop: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: spiffe-interop x509|jwt|serve|dial [flags]")
	}
	cmd, args := os.Args[1], os.Args[2:]
	fs := flag.NewFlagSet(cmd, flag.ExitOnError)
	updates := fs.Int("updates", 1, "x509: SVID updates to print before exiting")
	audience := fs.String("audience", "", "jwt: audience")
	addr := fs.String("addr", "", "serve/dial: TCP address")
	authorize := fs.String("authorize", "", "serve/dial: the only peer SPIFFE ID accepted")
	msg := fs.String("msg", "", "dial: line to send")
	timeout := fs.Duration("timeout", 30*time.Second, "overall deadline")
	if err := fs.Parse(args); err != nil {
		fail("%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	switch cmd {
	case "x509":
		x509Cmd(ctx, *updates)
	case "jwt":
		jwtCmd(ctx, *audience)
	case "serve":
		serveCmd(ctx, *addr, parseID(*authorize))
	case "dial":
		dialCmd(ctx, *addr, parseID(*authorize), *msg)
	default:
		fail("unknown command %q", cmd)
	}
}

func parseID(s string) spiffeid.ID {
	id, err := spiffeid.FromString(s)
	if err != nil {
		fail("-authorize %q: %v", s, err)
	}
	return id
}

// x509Cmd prints the SVID the X509Source holds, then every rotation, `updates` in all.
func x509Cmd(ctx context.Context, updates int) {
	source, err := workloadapi.NewX509Source(ctx)
	if err != nil {
		fail("NewX509Source: %v", err)
	}
	defer source.Close()
	lastSerial := ""
	for n := 0; n < updates; {
		svid, err := source.GetX509SVID()
		if err != nil {
			fail("GetX509SVID: %v", err)
		}
		serial := svid.Certificates[0].SerialNumber.Text(16)
		if serial != lastSerial {
			lastSerial = serial
			n++
			// Verified by go-spiffe against the bundle it received, not just parsed.
			verified, _, err := x509svid.Verify(svid.Certificates, source)
			if err != nil {
				fail("x509svid.Verify: %v", err)
			}
			pub, err := x509.MarshalPKIXPublicKey(svid.Certificates[0].PublicKey)
			if err != nil {
				fail("public key: %v", err)
			}
			keyPub, err := x509.MarshalPKIXPublicKey(svid.PrivateKey.Public())
			if err != nil {
				fail("private key's public half: %v", err)
			}
			sum := sha256.Sum256(pub)
			emit(map[string]any{
				"id":            svid.ID.String(),
				"verified_id":   verified.String(),
				"serial":        serial,
				"pubkey_sha256": hex.EncodeToString(sum[:]),
				"key_matches":   string(pub) == string(keyPub),
				"not_after":     svid.Certificates[0].NotAfter.Unix(),
			})
			if n == updates {
				return
			}
		}
		select {
		case <-source.Updated():
		case <-ctx.Done():
			fail("waiting for SVID update %d: %v", n+1, ctx.Err())
		}
	}
}

// jwtCmd fetches a JWT-SVID and validates it with the JWT bundles of a JWTSource.
func jwtCmd(ctx context.Context, audience string) {
	svid, err := workloadapi.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		fail("FetchJWTSVID: %v", err)
	}
	source, err := workloadapi.NewJWTSource(ctx)
	if err != nil {
		fail("NewJWTSource: %v", err)
	}
	defer source.Close()
	valid, err := jwtsvid.ParseAndValidate(svid.Marshal(), source, []string{audience})
	if err != nil {
		fail("jwtsvid.ParseAndValidate: %v", err)
	}
	_, wrongErr := jwtsvid.ParseAndValidate(svid.Marshal(), source, []string{audience + "-other"})
	emit(map[string]any{
		"id":                      svid.ID.String(),
		"token":                   svid.Marshal(),
		"verified_id":             valid.ID.String(),
		"audience":                valid.Audience,
		"expiry":                  valid.Expiry.Unix(),
		"wrong_audience_rejected": wrongErr != nil,
		"wrong_audience_error":    fmt.Sprint(wrongErr),
	})
}

// serveCmd accepts mTLS connections from `authorized` only and answers each line.
func serveCmd(ctx context.Context, addr string, authorized spiffeid.ID) {
	l, err := spiffetls.Listen(ctx, "tcp", addr, tlsconfig.AuthorizeID(authorized))
	if err != nil {
		fail("spiffetls.Listen: %v", err)
	}
	defer l.Close()
	emit(map[string]any{"listening": l.Addr().String(), "authorize": authorized.String()})
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			fail("accept: %v", err)
		}
		go handle(conn)
	}
}

func handle(conn net.Conn) {
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	// The handshake (and the authorizer) runs here: a peer with another ID is refused.
	peer, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		emit(map[string]any{"refused": err.Error()})
		return
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil && line == "" {
		emit(map[string]any{"peer": peer.String(), "read_error": err.Error()})
		return
	}
	emit(map[string]any{"peer": peer.String(), "received": line})
	fmt.Fprintf(conn, "go-spiffe server saw %s: %s", peer, line)
}

// dialCmd connects to a server that must present `authorized`, sends msg, prints the reply.
func dialCmd(ctx context.Context, addr string, authorized spiffeid.ID, msg string) {
	conn, err := spiffetls.Dial(ctx, "tcp", addr, tlsconfig.AuthorizeID(authorized))
	if err != nil {
		fail("spiffetls.Dial: %v", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	server, err := spiffetls.PeerIDFromConn(conn)
	if err != nil {
		fail("server ID: %v", err)
	}
	if _, err := fmt.Fprintf(conn, "%s\n", msg); err != nil {
		fail("write: %v", err)
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		fail("read reply: %v", err)
	}
	emit(map[string]any{"server": server.String(), "reply": reply})
}
