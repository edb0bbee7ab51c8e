// Command server is a TCP chat server: connect with nc or telnet, and every
// line you type goes to everyone online. who lists them, rename|NAME picks a
// name, to|NAME|TEXT whispers, and users who send nothing for -idle are
// kicked. The wire protocol is that of the Go tutorial's 即时通信系统.
package main

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math"
	"net"
	"net/http"
	_ "net/http/pprof" // its profiles on http.DefaultServeMux, beside expvar's counters
	"net/netip"
	"os"
	"os/signal"
	"regexp"
	"runtime/debug"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main without the exit, so that it can be tested: it returns 0 after
// a clean stop, 1 when the server cannot run, and 2 for bad flags.
func run(args []string, stdout, stderr io.Writer) int {
	cfg := Config{Idle: 5 * time.Minute, MaxConns: 10000, MaxConnsPerIP: 16, Rate: 5}
	host, port, debugAddr, logFormat := "127.0.0.1", 8888, "", "text"
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.Func("ip", "`address` to listen on: an IP address (127.0.0.1, 0.0.0.0, ::1, [::1], ::) or a host name (default 127.0.0.1)",
		func(s string) (err error) { host, err = parseHost(s); return err })
	fs.Func("port", "TCP `port` to listen on, 0 to pick a free one (default 8888)", intFlag(&port, 65535))
	fs.Func("idle", "kick a user who sends no line for this `duration` (10s, 5m, 1h30m), 0 to never kick (default 5m)",
		func(s string) (err error) {
			cfg.Idle, err = time.ParseDuration(s)
			return want(err == nil && cfg.Idle >= 0, "a duration of 0 or more with its unit, such as 10s or 5m")
		})
	fs.Func("max-conns", "most `users` online at once, 0 for no limit (default 10000)", intFlag(&cfg.MaxConns, math.MaxInt32))
	fs.Func("max-conns-per-ip", "most `users` online at once from one address (IPv4, or IPv6 /64), which may also open twice as many connections at once and as many a minute; 0 for no limit (default 16)",
		intFlag(&cfg.MaxConnsPerIP, math.MaxInt32))
	fs.Func("rate", "flood control: the `units` a user's budget of 20 gets back each second (a line costs one per started 512 bytes), from 0.01 to 1000, or 0 for no limit (default 5)",
		func(s string) (err error) {
			cfg.Rate, err = strconv.ParseFloat(s, 64)
			return want(err == nil && (cfg.Rate == 0 || cfg.Rate >= 0.01 && cfg.Rate <= 1000), "0, or a number of units a second from 0.01 to 1000, such as 5 or 0.5")
		})
	tlsCert := fs.String("tls-cert", "", "certificate `file` (PEM); with -tls-key, clients speak TLS 1.2 or later on the port")
	tlsKey := fs.String("tls-key", "", "private key `file` (PEM) of -tls-cert")
	fs.Func("log-format", "the log's `format` on stderr: text or json (default text)", func(s string) error {
		logFormat = s
		return want(s == "text" || s == "json", "text or json")
	})
	fs.Func("debug-addr", "serve the counters (/debug/vars) and profiles (/debug/pprof/) over HTTP on this `host:port` (the host as -ip takes it, empty for every interface); off if empty",
		func(s string) error {
			h, p, err := net.SplitHostPort(s)
			h, herr := parseHost(cmp.Or(h, "::"))
			n, perr := strconv.Atoi(p)
			debugAddr = net.JoinHostPort(h, p)
			return want(err == nil && herr == nil && perr == nil && n >= 0 && n <= 65535, "host:port, such as 127.0.0.1:6060 (a port from 0 to 65535)")
		})
	version := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: server [-ip 127.0.0.1] [-port 8888] [-idle 5m] [-max-conns 10000]\n"+
			"              [-max-conns-per-ip 16] [-rate 5] [-tls-cert FILE -tls-key FILE]\n"+
			"              [-log-format text] [-debug-addr HOST:PORT] [-version]\n\n"+
			"A TCP chat server. Connect with: nc 127.0.0.1 8888\n\n")
		fs.PrintDefaults()
	}
	// flag prints its error and the whole usage on a bad value; we print one
	// line instead, and the usage only when asked for it.
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fs.SetOutput(stderr)
		fs.Usage()
		return 0
	}
	if err == nil && fs.NArg() > 0 {
		err = fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if err == nil && *version {
		fmt.Fprintln(stdout, versionLine())
		return 0
	}
	if err == nil {
		cfg.TLS, err = loadTLS(*tlsCert, *tlsKey)
	}
	var addr, debug netip.AddrPort
	if err == nil {
		addr, err = resolve("-ip", net.JoinHostPort(host, strconv.Itoa(port)))
	}
	if err == nil && debugAddr != "" {
		debug, err = resolve("-debug-addr", debugAddr)
	}
	if err != nil {
		fmt.Fprintf(stderr, "server: %v (see server -h)\n", err)
		return 2
	}

	var h slog.Handler = slog.NewTextHandler(stderr, nil)
	if logFormat == "json" {
		h = slog.NewJSONHandler(stderr, nil)
	}
	ln, err := listenTCP(addr)
	if err != nil {
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	// The log's reader may go first: Ctrl-C on "./server 2>&1 | tee log"
	// ends tee too, and Go kills a program whose write to a closed stderr
	// raises SIGPIPE, before the server has told its users it stops. With
	// the signal ignored, that write just fails.
	signal.Ignore(syscall.SIGPIPE)
	// Closing the terminal sends SIGHUP; it stops the server as SIGTERM
	// does, unless the server was started with it ignored (nohup), to
	// outlive its terminal: asking for it would undo that.
	stopSignals := []os.Signal{os.Interrupt, syscall.SIGTERM}
	if !signal.Ignored(syscall.SIGHUP) {
		stopSignals = append(stopSignals, syscall.SIGHUP)
	}
	ctx, stop := signal.NotifyContext(context.Background(), stopSignals...)
	defer stop()
	// After the first signal, a second one kills the process at once.
	context.AfterFunc(ctx, stop)

	srv := NewServer(slog.New(h), cfg)
	if debugAddr != "" {
		if err := serveDebug(ctx, debug, srv); err != nil {
			ln.Close()
			fmt.Fprintf(stderr, "server: -debug-addr: %v\n", err)
			return 1
		}
	}
	if err := srv.Serve(ctx, ln); err != nil {
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	return 0
}

// intFlag sets *v to a whole number from 0 to max.
func intFlag(v *int, max int) func(string) error {
	return func(s string) (err error) {
		*v, err = strconv.Atoi(s)
		return want(err == nil && *v >= 0 && *v <= max, fmt.Sprintf("a whole number from 0 to %d", max))
	}
}

// want is a flag's error: what it wants, unless ok.
func want(ok bool, what string) error {
	if ok {
		return nil
	}
	return errors.New("want " + what)
}

// parseHost takes an IP address, with or without both brackets, or a host
// name as RFC 1123 writes one: dot-separated labels of letters, digits and
// inner hyphens.
func parseHost(s string) (string, error) {
	const wanted = "an IP address or a host name, such as 127.0.0.1, ::1 or localhost"
	if ip, ok := strings.CutPrefix(s, "["); ok {
		ip, ok = strings.CutSuffix(ip, "]")
		_, err := netip.ParseAddr(ip)
		return ip, want(ok && err == nil, wanted)
	}
	_, err := netip.ParseAddr(s)
	return s, want(err == nil || hostName.MatchString(s), wanted)
}

var hostName = regexp.MustCompile(`^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)*[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.?$`)

// resolve returns the address to listen on: hostPort's, or its host name's
// first address.
func resolve(flagName, hostPort string) (netip.AddrPort, error) {
	h, p, _ := net.SplitHostPort(hostPort)
	port, _ := strconv.Atoi(p)
	if a, err := netip.ParseAddr(h); err == nil {
		return netip.AddrPortFrom(a, uint16(port)), nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", h)
	if dns := (*net.DNSError)(nil); errors.As(err, &dns) {
		err = errors.New(dns.Err) // "no such host", without the name twice
	} else if err == nil && len(addrs) == 0 {
		err = errors.New("no address")
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("invalid value %q for flag %s: %w", h, flagName, err)
	}
	return netip.AddrPortFrom(addrs[0].Unmap(), uint16(port)), nil
}

// listenTCP listens on a: an IPv4 address with IPv4 alone, since Go would
// make 0.0.0.0 serve IPv6 as well; an IPv6 one as the system does (on
// Linux, :: serves IPv4 too).
func listenTCP(a netip.AddrPort) (net.Listener, error) {
	network := "tcp"
	if a.Addr().Is4() {
		network = "tcp4"
	}
	return net.Listen(network, a.String())
}

// versionLine is the module's version and the VCS revision and time it
// was built from, as the Go toolchain recorded them.
func versionLine() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "server (no build information)"
	}
	line := "server " + bi.Main.Version
	vcs := map[string]string{}
	for _, s := range bi.Settings {
		vcs[s.Key] = s.Value
	}
	if rev := vcs["vcs.revision"]; rev != "" {
		line += " " + rev + map[string]string{"true": "+modified"}[vcs["vcs.modified"]] + " " + vcs["vcs.time"]
	}
	return line + " " + bi.GoVersion
}

// loadTLS loads the certificate and key: both or neither.
func loadTLS(certFile, keyFile string) (*tls.Config, error) {
	switch {
	case certFile == "" && keyFile == "":
		return nil, nil
	case certFile == "" || keyFile == "":
		return nil, errors.New("-tls-cert and -tls-key go together")
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("-tls-cert, -tls-key: %w", err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// The debug listener's own bounds: it must never take what the chat needs.
const (
	maxDebugConns    = 8
	debugIdleTimeout = 30 * time.Second
)

// serveDebug serves what an operator looks at on addr, until ctx is done:
// expvar's /debug/vars, the server's counters under "chat", and
// net/http/pprof's /debug/pprof/.
func serveDebug(ctx context.Context, addr netip.AddrPort, srv *Server) error {
	ln, err := listenTCP(addr)
	if err != nil {
		return err
	}
	if !addr.Addr().IsLoopback() {
		srv.event(slog.LevelWarn, "the debug listener is not on a loopback address: whoever reaches it can read the counters and take profiles", "addr", ln.Addr().String())
	}
	expvar.Publish("chat", &srv.vars)
	hs := debugServer(srv)
	go hs.Serve(ln)
	context.AfterFunc(ctx, func() { hs.Close() })
	srv.event(slog.LevelInfo, "debug listening", "addr", ln.Addr().String())
	return nil
}

// debugServer is the debug listener's HTTP server, serving
// http.DefaultServeMux, where expvar and net/http/pprof put their pages
// (nothing else in the program does). It holds at most
// maxDebugConns connections, each for a bounded time, and its errors go to
// the server's log: it never takes what the chat needs.
func debugServer(srv *Server) *http.Server {
	var open atomic.Int32
	return &http.Server{ReadHeaderTimeout: 5 * time.Second, IdleTimeout: debugIdleTimeout,
		ErrorLog: log.New(logWriter(func(msg string) { srv.event(slog.LevelWarn, "debug listener", "err", msg) }), "", 0),
		ConnState: func(c net.Conn, state http.ConnState) {
			switch state {
			case http.StateNew:
				if open.Add(1) > maxDebugConns {
					c.Close() // past the bound: closed at once
				}
			case http.StateClosed, http.StateHijacked:
				open.Add(-1)
			}
		}}
}

type logWriter func(string)

func (w logWriter) Write(p []byte) (int, error) {
	w(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}
