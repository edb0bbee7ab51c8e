// Command server is a TCP chat server: connect with nc or telnet, and every
// line you type goes to everyone online. who lists them, rename|NAME picks a
// name, to|NAME|TEXT whispers, and users who send nothing for -idle are
// kicked. The wire protocol is that of the Go tutorial's 即时通信系统.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"expvar"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run is main without the exit, so that it can be tested: it returns 0 after
// a clean stop, 1 when the server cannot run, and 2 for bad flags.
func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	ip := hostFlag("127.0.0.1")
	fs.Var(&ip, "ip", "`address` to listen on: an IP address (127.0.0.1, 0.0.0.0, ::1, ::) or a host name")
	port := rangeFlag{v: 8888, max: 65535}
	fs.Var(&port, "port", "TCP `port` to listen on, 0 to pick a free one")
	idle := durationFlag(5 * time.Minute)
	fs.Var(&idle, "idle", "kick a user who sends no line for this `duration` (10s, 5m, 1h30m), 0 to never kick")
	maxConns := rangeFlag{v: 10000, max: math.MaxInt32}
	fs.Var(&maxConns, "max-conns", "most `users` online at once, 0 for no limit")
	perIP := rangeFlag{v: 16, max: math.MaxInt32}
	fs.Var(&perIP, "max-conns-per-ip", "most `users` online at once from one address (IPv4, or IPv6 /64), which may also open twice as many connections at once and as many a minute; 0 for no limit")
	rate := rateFlag(5)
	fs.Var(&rate, "rate", "flood control: the `units` a user's budget of 20 gets back each second (a line costs one per started 512 bytes), 0 for no limit")
	tlsCert := fs.String("tls-cert", "", "certificate `file` (PEM); with -tls-key, clients speak TLS 1.2 or later on the port")
	tlsKey := fs.String("tls-key", "", "private key `file` (PEM) of -tls-cert")
	logFormat := choiceFlag{v: "text", of: []string{"text", "json"}}
	fs.Var(&logFormat, "log-format", "the log's `format` on stderr: text or json")
	debugAddr := hostPortFlag{port: rangeFlag{max: 65535}}
	fs.Var(&debugAddr, "debug-addr", "serve the counters (/debug/vars) and profiles (/debug/pprof/) over HTTP on this `host:port` (the host as -ip takes it); off if empty")
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
	cfg := Config{Idle: time.Duration(idle), MaxConns: maxConns.v, MaxConnsPerIP: perIP.v, Rate: float64(rate)}
	if err == nil {
		cfg.TLS, err = loadTLS(*tlsCert, *tlsKey)
	}
	var host, debugHost netip.Addr
	if err == nil {
		host, err = ip.resolve("-ip")
	}
	if err == nil && debugAddr.set {
		debugHost, err = debugAddr.host.resolve("-debug-addr")
	}
	if err != nil {
		fmt.Fprintf(stderr, "server: %v (see server -h)\n", err)
		return 2
	}

	var h slog.Handler = slog.NewTextHandler(stderr, nil)
	if logFormat.v == "json" {
		h = slog.NewJSONHandler(stderr, nil)
	}
	log := slog.New(h)
	ln, err := listenTCP(netip.AddrPortFrom(host, uint16(port.v)))
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

	srv := NewServer(log, cfg)
	if debugAddr.set {
		if err := serveDebug(ctx, netip.AddrPortFrom(debugHost, uint16(debugAddr.port.v)), srv, log); err != nil {
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
		line += " " + rev
		if vcs["vcs.modified"] == "true" {
			line += "+modified"
		}
		line += " " + vcs["vcs.time"]
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

// serveDebug serves what an operator looks at on addr, until ctx is done:
// expvar's /debug/vars, the server's counters under "chat", and
// net/http/pprof's /debug/pprof/.
func serveDebug(ctx context.Context, addr netip.AddrPort, srv *Server, log *slog.Logger) error {
	ln, err := listenTCP(addr)
	if err != nil {
		return err
	}
	warnIfExposed(log, ln.Addr())
	expvar.Publish("chat", expvar.Func(func() any { return srv.Stats() }))
	mux := http.NewServeMux()
	mux.Handle("/debug/vars", expvar.Handler())
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go hs.Serve(ln)
	context.AfterFunc(ctx, func() { hs.Close() })
	log.Info("debug listening", "addr", ln.Addr().String())
	return nil
}

// warnIfExposed warns when the debug listener's address a is not a
// loopback one: whoever reaches it can read the counters and take profiles.
func warnIfExposed(log *slog.Logger, a net.Addr) {
	if ta, ok := a.(*net.TCPAddr); ok && !ta.IP.IsLoopback() {
		log.Warn("the debug listener is not on a loopback address: whoever reaches it can read the counters and take profiles", "addr", a.String())
	}
}

// listenTCP listens on a: an IPv4 address with IPv4 alone, since Go would
// make 0.0.0.0 serve IPv6 as well; an IPv6 one as the system does (on
// Linux, :: serves IPv4 too).
func listenTCP(a netip.AddrPort) (net.Listener, error) {
	return net.Listen(tcpNetwork(a.Addr()), a.String())
}

func tcpNetwork(a netip.Addr) string {
	if a.Is4() {
		return "tcp4"
	}
	return "tcp"
}

// hostFlag is an IP address, with or without brackets, or a host name.
type hostFlag string

func (f *hostFlag) String() string { return string(*f) }

func (f *hostFlag) Set(s string) error {
	h := strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
	if _, err := netip.ParseAddr(h); err != nil && !isHostName(h) {
		return errors.New("want an IP address or a host name, such as 127.0.0.1, ::1 or localhost")
	}
	*f = hostFlag(h)
	return nil
}

// resolve returns the address to listen on: the flag's, or its host name's
// first address.
func (f hostFlag) resolve(name string) (netip.Addr, error) {
	if a, err := netip.ParseAddr(string(f)); err == nil {
		return a, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", string(f))
	var dns *net.DNSError
	switch {
	case errors.As(err, &dns) && dns.IsNotFound:
		err = errors.New("no such host")
	case errors.As(err, &dns):
		err = errors.New(dns.Err)
	case err == nil && len(addrs) == 0:
		err = errors.New("no address")
	}
	if err != nil {
		return netip.Addr{}, fmt.Errorf("invalid value %q for flag %s: %w", string(f), name, err)
	}
	return addrs[0].Unmap(), nil
}

// hostPortFlag is host:port, the host as hostFlag takes it, or empty
// (":6060") for every interface.
type hostPortFlag struct {
	host hostFlag
	port rangeFlag
	set  bool
}

func (f *hostPortFlag) String() string {
	if !f.set {
		return ""
	}
	return net.JoinHostPort(string(f.host), f.port.String())
}

func (f *hostPortFlag) Set(s string) error {
	h, p, err := net.SplitHostPort(s)
	if h == "" {
		h = "::"
	}
	if err != nil || f.port.Set(p) != nil || f.host.Set(h) != nil {
		return fmt.Errorf("want host:port, such as 127.0.0.1:6060 (a port from 0 to %d)", f.port.max)
	}
	f.set = true
	return nil
}

// isHostName reports whether s is a host name as RFC 1123 writes one:
// dot-separated labels of letters, digits and inner hyphens.
func isHostName(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range []byte(label) {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

// choiceFlag is one of a few words.
type choiceFlag struct {
	v  string
	of []string
}

func (f *choiceFlag) String() string { return f.v }

func (f *choiceFlag) Set(s string) error {
	for _, c := range f.of {
		if s == c {
			f.v = s
			return nil
		}
	}
	return fmt.Errorf("want one of %s", strings.Join(f.of, ", "))
}

// rangeFlag is a whole number from 0 to max.
type rangeFlag struct{ v, max int }

func (f *rangeFlag) String() string { return strconv.Itoa(f.v) }

func (f *rangeFlag) Set(s string) error {
	v, err := strconv.Atoi(s)
	if err != nil || v < 0 || v > f.max {
		return fmt.Errorf("want a whole number from 0 to %d", f.max)
	}
	f.v = v
	return nil
}

// rateFlag is a number of units per second, 0 or more.
type rateFlag float64

func (f *rateFlag) String() string { return strconv.FormatFloat(float64(*f), 'g', -1, 64) }

func (f *rateFlag) Set(s string) error {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return errors.New("want a number of units a second, 0 or more, such as 5 or 0.5")
	}
	*f = rateFlag(v)
	return nil
}

// durationFlag is a duration of 0 or more. time.ParseDuration's own error
// does not say that the unit is required.
type durationFlag time.Duration

func (f *durationFlag) String() string { return time.Duration(*f).String() }

func (f *durationFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return errors.New("want a duration of 0 or more with its unit, such as 10s or 5m")
	}
	*f = durationFlag(d)
	return nil
}
