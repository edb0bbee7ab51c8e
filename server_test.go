package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
	"unicode"
)

// The replies of README's "What a line does", written out again rather
// than taken from the code, so that a changed reply fails here.
const (
	r1  = "用户名不合法：1-32个字符，不能包含空白和 | : [ ]"
	r2  = "当前用户名被使用了"
	r3  = "您已更新用户名："
	r4  = "消息格式不正确"
	r5  = "不存在该用户"
	r6  = "无消息内容，请重发"
	r7  = "消息过长"
	r8  = "你被踢出了"
	r9  = "服务器已满，请稍后再试"
	r10 = "服务器即将关闭"
	r11 = "来自您地址的连接过多，请稍后再试"
	r12 = "对方暂时无法接收，请稍后再试"
)

// testTimeout bounds every wait in a test. In a synctest bubble it is fake
// time, so a line that never comes fails the test at once.
const testTimeout = 10 * time.Second

// TestMain lets the test binary act as the server itself, for the tests
// that run the real process (flags, signals, exit status).
func TestMain(m *testing.M) {
	if os.Getenv("CHAT_SERVER_NOHUP") == "1" {
		// Start the server as nohup does: with SIGHUP ignored, which
		// survives exec.
		signal.Ignore(syscall.SIGHUP)
		env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "CHAT_SERVER_NOHUP=") })
		err := syscall.Exec(os.Args[0], os.Args, env)
		fmt.Fprintln(os.Stderr, "exec:", err)
		os.Exit(1)
	}
	if n, err := strconv.ParseUint(os.Getenv("CHAT_SERVER_NOFILE"), 10, 64); err == nil {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &syscall.Rlimit{Cur: n, Max: n}); err != nil {
			fmt.Fprintln(os.Stderr, "setrlimit:", err)
			os.Exit(1)
		}
	}
	if os.Getenv("CHAT_SERVER_MAIN") == "1" {
		// A test that starts a server keeps a pipe on its stdin: should the
		// test binary die (a timeout's panic runs no cleanup), the pipe
		// ends, and so does this server, rather than outlive the tests.
		if fi, err := os.Stdin.Stat(); err == nil && fi.Mode()&os.ModeNamedPipe != 0 {
			go func() {
				io.Copy(io.Discard, os.Stdin)
				os.Exit(3)
			}()
		}
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// ---- test server and clients ----

type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// pipeListener is a net.Listener of net.Pipe connections. Each gets its
// own address, 127.0.0.1:10001 and up, so users have distinct names.
type pipeListener struct {
	conns  chan net.Conn
	done   chan struct{}
	once   sync.Once
	port   atomic.Int32
	writes atomic.Int64 // Write calls the server made on all its connections
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 8888} }

func (l *pipeListener) dial() (net.Conn, string, error) { return l.dialFrom("127.0.0.1") }

// dialFrom connects as if from the IP address ip.
func (l *pipeListener) dialFrom(ip string) (net.Conn, string, error) {
	srv, cli := net.Pipe()
	addr := &net.TCPAddr{IP: net.ParseIP(ip), Port: 10000 + int(l.port.Add(1))}
	select {
	case l.conns <- &addrConn{srv, addr, &l.writes}:
		return cli, addr.String(), nil
	case <-l.done:
		return nil, "", net.ErrClosed
	}
}

// addrConn is the server's end of a pipe, with a remote address, counting
// the server's writes.
type addrConn struct {
	net.Conn
	remote net.Addr
	writes *atomic.Int64
}

func (c *addrConn) RemoteAddr() net.Addr { return c.remote }

func (c *addrConn) Write(p []byte) (int, error) {
	c.writes.Add(1)
	return c.Conn.Write(p)
}

type testServer struct {
	tb       testing.TB
	logs     *logBuffer
	srv      *Server
	ln       *pipeListener // for a server on pipes
	addr     string        // for a server on loopback
	label    string
	dial     func() (net.Conn, string, error)
	dialFrom func(ip string) (net.Conn, string, error)
	cancel   context.CancelFunc
	done     chan error
	once     sync.Once
	stopped  chan struct{}
	err      error
}

func startServer(tb testing.TB, ln net.Listener, cfg Config) *testServer {
	logs := &logBuffer{}
	return startServerLog(tb, ln, cfg, logs, logs)
}

// startServerLog starts a server that logs to w; logs is what the test reads.
func startServerLog(tb testing.TB, ln net.Listener, cfg Config, w io.Writer, logs *logBuffer) *testServer {
	srv := NewServer(slog.New(slog.NewTextHandler(w, nil)), cfg)
	ctx, cancel := context.WithCancel(context.Background())
	ts := &testServer{tb: tb, logs: logs, srv: srv, cancel: cancel, done: make(chan error, 1)}
	ts.label = fmt.Sprint(serverLabels.Add(1))
	go func() {
		// Every goroutine the server starts carries the label, so that
		// stop can tell whether any outlives Serve, whatever other tests
		// run beside this one.
		var err error
		pprof.Do(ctx, pprof.Labels("chatserver", ts.label), func(ctx context.Context) {
			err = srv.Serve(ctx, ln)
		})
		ts.done <- err
	}()
	tb.Cleanup(func() {
		if err := ts.stop(); err != nil {
			tb.Errorf("Serve: %v", err)
		}
	})
	return ts
}

var serverLabels atomic.Int64

// leftGoroutines counts the goroutines that carry the server's label, and
// says where they are.
func (ts *testServer) leftGoroutines() (int, string) {
	var b bytes.Buffer
	pprof.Lookup("goroutine").WriteTo(&b, 1)
	// Each group of goroutines is "N @ pc…", then its labels on a line of
	// their own, then its stack, then an empty line.
	n, where := 0, ""
	for _, group := range strings.Split(b.String(), "\n\n") {
		if strings.Contains(group, `"chatserver":"`+ts.label+`"`) {
			count, _, _ := strings.Cut(group, " @ ")
			k, _ := strconv.Atoi(count)
			n, where = n+k, where+group+"\n"
		}
	}
	return n, where
}

// startPipe starts a server on net.Pipe connections; it works in a bubble.
func startPipe(tb testing.TB, cfg Config) *testServer {
	ln := newPipeListener()
	ts := startServer(tb, ln, cfg)
	ts.ln, ts.dial, ts.dialFrom = ln, ln.dial, ln.dialFrom
	return ts
}

// startTCP starts a server on a loopback port.
func startTCP(tb testing.TB, cfg Config) *testServer {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	ts := startServer(tb, ln, cfg)
	ts.addr = ln.Addr().String()
	ts.dial = dialTCP(ts.addr)
	ts.dialFrom = func(ip string) (net.Conn, string, error) {
		d := net.Dialer{Timeout: testTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
		c, err := d.Dial("tcp", ln.Addr().String())
		if err != nil {
			return nil, "", err
		}
		return c, c.LocalAddr().String(), nil
	}
	return ts
}

// dialTCP dials addr, and gives the client's address as the server
// prints it.
func dialTCP(addr string) func() (net.Conn, string, error) {
	return func() (net.Conn, string, error) {
		c, err := net.DialTimeout("tcp", addr, testTimeout)
		if err != nil {
			return nil, "", err
		}
		return c, c.LocalAddr().String(), nil
	}
}

// logged waits until the server has logged an event of this name on a line
// that holds each of attrs (the log is written by a goroutine of its own),
// at most testTimeout; it reports whether it did.
func (ts *testServer) logged(event string, attrs ...string) bool {
	ts.tb.Helper()
	for range testTimeout / (10 * time.Millisecond) {
		for _, line := range strings.Split(ts.logs.String(), "\n") {
			if strings.Contains(line, "msg="+event+" ") && !slices.ContainsFunc(attrs, func(a string) bool { return !strings.Contains(line, a) }) {
				return true
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

// expectLogged checks that the server logs an event of this name, on a
// line that holds each of attrs.
func (ts *testServer) expectLogged(event string, attrs ...string) {
	ts.tb.Helper()
	if !ts.logged(event, attrs...) {
		ts.tb.Errorf("no %s %q in the log:\n%s", event, attrs, ts.logs.String())
	}
}

// stop ends the server and waits for Serve, a bounded time. Any number of
// goroutines may call it: the stop runs once, and each waits on a channel,
// which does not stop synctest's clock as a sync.Once's lock would.
func (ts *testServer) stop() error {
	ts.once.Do(func() {
		ts.stopped = make(chan struct{})
		go func() {
			defer close(ts.stopped)
			ts.cancel()
			select {
			case ts.err = <-ts.done:
			case <-time.After(shutdownTimeout + time.Second):
				ts.err = errors.New("Serve did not return in time")
				return
			}
			// Serve waits for every goroutine it started; the helpers that
			// tell it so may take a moment more to return. Bounded.
			for i := 0; ; i++ {
				n, where := ts.leftGoroutines()
				if n == 0 {
					return
				}
				if i == 100 {
					ts.err = fmt.Errorf("%d goroutines left after Serve returned:\n%s", n, where)
					return
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
	})
	<-ts.stopped
	return ts.err
}

type client struct {
	tb   testing.TB
	conn net.Conn
	r    *bufio.Reader
	addr string // as the server prints it
	name string
}

// connect opens a connection and reads nothing.
func (ts *testServer) connect() *client {
	ts.tb.Helper()
	return ts.newClient(ts.dial())
}

// connectFrom opens a connection from the IP address ip, and reads nothing.
func (ts *testServer) connectFrom(ip string) *client {
	ts.tb.Helper()
	return ts.newClient(ts.dialFrom(ip))
}

func (ts *testServer) newClient(conn net.Conn, addr string, err error) *client {
	ts.tb.Helper()
	if err != nil {
		ts.tb.Fatalf("dial: %v", err)
	}
	ts.tb.Cleanup(func() { conn.Close() })
	return &client{tb: ts.tb, conn: conn, r: bufio.NewReader(conn), addr: addr, name: addr}
}

// joinFrom is join from the IP address ip.
func (ts *testServer) joinFrom(ip string, others ...*client) *client {
	ts.tb.Helper()
	c := ts.connectFrom(ip)
	c.expect(c.online())
	for _, o := range others {
		o.expect(c.online())
	}
	return c
}

// join connects a user and waits until it, and each of others, has seen it
// come online.
func (ts *testServer) join(others ...*client) *client {
	ts.tb.Helper()
	c := ts.connect()
	c.expect(c.online())
	for _, o := range others {
		o.expect(c.online())
	}
	return c
}

func (c *client) prefix() string       { return "[" + c.addr + "]" + c.name + ":" }
func (c *client) online() string       { return c.prefix() + "已上线" }
func (c *client) offline() string      { return c.prefix() + "已下线" }
func (c *client) whoLine() string      { return c.prefix() + "在线..." }
func (c *client) says(s string) string { return c.prefix() + s }

// write sends s as it is.
func (c *client) write(s string) {
	c.tb.Helper()
	c.conn.SetWriteDeadline(time.Now().Add(testTimeout))
	if _, err := io.WriteString(c.conn, s); err != nil {
		c.tb.Fatalf("%s: write: %v", c.name, err)
	}
}

// send sends each line with its "\n".
func (c *client) send(lines ...string) {
	c.tb.Helper()
	c.write(strings.Join(lines, "\n") + "\n")
}

func (c *client) readLine() (string, error) {
	c.conn.SetReadDeadline(time.Now().Add(testTimeout))
	s, err := c.r.ReadString('\n')
	if err != nil {
		return s, err
	}
	return strings.TrimSuffix(s, "\n"), nil
}

// expect reads one line for each of want, which it must equal.
func (c *client) expect(want ...string) {
	c.tb.Helper()
	for _, w := range want {
		got, err := c.readLine()
		if err != nil {
			c.tb.Fatalf("%s: want %.80q, got error %v (partial %.80q)", c.name, w, err, got)
		}
		if got != w {
			c.tb.Fatalf("%s: got line %.80q, want %.80q", c.name, got, w)
		}
	}
}

// expectWho sends who and expects the reply: one line for each of users,
// sorted by name.
func (c *client) expectWho(users ...*client) {
	c.tb.Helper()
	users = slices.Clone(users)
	slices.SortFunc(users, func(a, b *client) int { return strings.Compare(a.name, b.name) })
	c.send("who")
	for _, u := range users {
		c.expect(u.whoLine())
	}
	c.sync()
}

// expectEOF reads the end of the connection: the server closed it
// cleanly, and did not reset it (which can destroy the last lines before
// the client reads them).
func (c *client) expectEOF() {
	c.tb.Helper()
	if got, err := c.readLine(); err != io.EOF {
		c.tb.Fatalf("%s: got %q, %v; want the connection closed (EOF)", c.name, got, err)
	}
	c.conn.Close() // as a client does: the server's lingering read ends
}

// expectClosed reads until the server closes the connection; no line may
// come first.
func (c *client) expectClosed() {
	c.tb.Helper()
	got, err := c.readLine()
	switch {
	case err == nil:
		c.tb.Fatalf("%s: got line %q, want the connection closed", c.name, got)
	case errors.Is(err, os.ErrDeadlineExceeded):
		c.tb.Fatalf("%s: connection still open after %v", c.name, testTimeout)
	}
	c.conn.Close() // as a client does: the server's lingering read ends
}

// sync proves that nothing else is queued for c: every line for c passes
// through one queue, so the reply to a probe sent now must be the next
// line c reads.
func (c *client) sync() {
	c.tb.Helper()
	c.send("to|")
	c.expect(r4)
}

func (c *client) rename(name string) {
	c.tb.Helper()
	c.send("rename|" + name)
	c.expect(r3 + name)
	c.name = name
}

// ---- the protocol, over net.Pipe ----

// The users of TestCommands, as the pipe listener numbers them.
const (
	addrA = "127.0.0.1:10001"
	addrB = "127.0.0.1:10002"
)

func TestCommands(t *testing.T) {
	t.Parallel()
	long := strings.Repeat("名", 32)
	a := func(text string) []string { return []string{"[" + addrA + "]alice:" + text} }
	tests := []struct {
		name  string
		send  string   // what alice writes
		alice []string // the lines alice then gets
		bob   []string // the lines bob then gets
	}{
		{"text", "hi\n", a("hi"), a("hi")},
		{"empty line", "\n", nil, nil},
		{"CRLF", "hi\r\n", a("hi"), a("hi")},
		{"only control characters", "\x01\x1b\x7f\r\n", nil, nil},
		{"ANSI escape loses ESC", "\x1b[31mred\x1b[0m\n", a("[31mred[0m"), a("[31mred[0m")},
		{"carriage return cannot overwrite", "fake\rreal\n", a("fakereal"), a("fakereal")},
		{"bell and C1 removed", "a\x07b\u0085c\u009bd\n", a("abcd"), a("abcd")},
		{"tab kept", "a\tb\n", a("a\tb"), a("a\tb")},
		{"bidi controls removed", "a\u202eb\u2066c\u2069\n", a("abc"), a("abc")},
		{"direction marks and separators removed", "a\u200eb\u200fc\u061cd\u2028e\u2029f\n", a("abcdef"), a("abcdef")},
		{"invalid UTF-8 runs", "a\xfe\xfdb\xc0c\n", a("a\uFFFDb\uFFFDc"), a("a\uFFFDb\uFFFDc")},
		{"control splits invalid run", "\xfe\x01\xfe\n", a("\uFFFD\uFFFD"), a("\uFFFD\uFFFD")},
		{"Chinese", "你好，世界\n", a("你好，世界"), a("你好，世界")},
		{"Chinese beside a control", "膨胀肮脏\x01x\n", a("膨胀肮脏x"), a("膨胀肮脏x")},
		{"who with a space is text", "who \n", a("who "), a("who ")},
		{"WHO is text", "WHO\n", a("WHO"), a("WHO")},
		{"rename without pipe is text", "rename\n", a("rename"), a("rename")},
		{"who", "who\n", []string{"[" + addrA + "]alice:在线...", "[" + addrB + "]bob:在线..."}, nil},
		{"rename", "rename|carol\n", []string{r3 + "carol"}, nil},
		{"rename 32 runes", "rename|" + long + "\n", []string{r3 + long}, nil},
		{"rename cleans first", "rename|a\x01b\n", []string{r3 + "ab"}, nil},
		{"rename cleans Chinese", "rename|膨胀\x01\n", []string{r3 + "膨胀"}, nil},
		{"rename empty", "rename|\n", []string{r1}, nil},
		{"rename only controls", "rename|\x01\x02\n", []string{r1}, nil},
		{"rename 33 runes", "rename|" + long + "x\n", []string{r1}, nil},
		{"rename space", "rename|a b\n", []string{r1}, nil},
		{"rename pipe", "rename|a|b\n", []string{r1}, nil},
		{"rename address", "rename|127.0.0.1:5\n", []string{r1}, nil},
		{"rename taken", "rename|bob\n", []string{r2}, nil},
		{"rename taken, other letter case", "rename|BOB\n", []string{r2}, nil},
		{"rename taken, full-width letters", "rename|ｂｏｂ\n", []string{r2}, nil},
		{"rename taken, look-alike letters", "rename|ЬоЬ\n", []string{r2}, nil}, // Cyrillic
		{"rename own name", "rename|alice\n", []string{r2}, nil},
		{"to| alone", "to|\n", []string{r4}, nil},
		{"to with empty name", "to||hi\n", []string{r4}, nil},
		{"to unknown, no text", "to|nobody\n", []string{r5}, nil},
		{"to unknown", "to|nobody|x\n", []string{r5}, nil},
		{"to without text", "to|bob\n", []string{r6}, nil},
		{"to with empty text", "to|bob|\n", []string{r6}, nil},
		{"whisper", "to|bob|hi\n", nil, []string{"alice对您说:hi"}},
		{"whisper finds the name in other letters", "to|BOB|hi\n", nil, []string{"alice对您说:hi"}},
		{"whisper finds a look-alike", "to|ｂоｂ|hi\n", nil, []string{"alice对您说:hi"}},
		{"whisper with pipes", "to|bob|a|b|\n", nil, []string{"alice对您说:a|b|"}},
		{"whisper is cleaned", "to|bob|\x1b[2Jx\n", nil, []string{"alice对您说:[2Jx"}},
		{"whisper to self", "to|alice|me\n", []string{"alice对您说:me"}, nil},
		{"course client whisper", "to|bob|hi\n\n", nil, []string{"alice对您说:hi"}},
		{"lines in one write run in order", "hi\nwho\nto|\nto|bob|x\n", []string{
			"[" + addrA + "]alice:hi", "[" + addrA + "]alice:在线...", "[" + addrB + "]bob:在线...", r4,
		}, []string{"[" + addrA + "]alice:hi", "alice对您说:x"}},
		// Telnet talking (README's "Framing"): taken out, and answered.
		{"telnet DO is answered WONT", "\xff\xfd\x01hi\n", []string{"\xff\xfc\x01" + a("hi")[0]}, a("hi")},
		{"telnet WILL is answered DONT", "\xff\xfb\x18hi\n", []string{"\xff\xfe\x18" + a("hi")[0]}, a("hi")},
		{"telnet WONT and DONT are not answered", "\xff\xfc\x01\xff\xfe\x01hi\n", a("hi"), a("hi")},
		{"telnet subnegotiation taken out", "h\xff\xfa\x18\x00\n\xff\xff\xff\xf0i\n", a("hi"), a("hi")},
		{"telnet AYT and NOP taken out", "h\xff\xf6i\xff\xf1\n", a("hi"), a("hi")},
		{"telnet IAC IAC is a 0xFF", "a\xff\xffb\n", a("a\uFFFDb"), a("a\uFFFDb")},
		{"a 0xFF that is not telnet's", "a\xffb\n", a("a\uFFFDb"), a("a\uFFFDb")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				ts := startPipe(t, Config{})
				alice := ts.join()
				bob := ts.join(alice)
				alice.rename("alice")
				bob.rename("bob")

				alice.write(tt.send)
				alice.expect(tt.alice...)
				bob.expect(tt.bob...)
				alice.sync()
				bob.sync()
			})
		})
	}
}

// telnet's Ctrl-C (IAC IP, then IAC DO TIMING-MARK) leaves the chat as
// Ctrl-C leaves nc: the rest get 已下线; a 0xFF at the end of one read and
// its command in the next are one command, and a 0xFF that ends the input
// is text.
func TestTelnetInterrupt(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		b := ts.join(a)
		a.write("\xff")
		synctest.Wait()
		a.write("\xfd\x01hi\n")
		a.expect("\xff\xfc\x01" + a.says("hi"))
		b.expect(a.says("hi"))
		a.write("typed\xff\xf4\xff\xfd\x06")
		b.expect(a.says("typed"), a.offline())
		a.expect(a.says("typed"))
		a.expectClosed()
		b.expectWho(b)
		ts.expectLogged("disconnect", `reason="closed by client"`)

		// A 0xFF with nothing after it, before the close, is no command:
		// invalid UTF-8, in the last line.
		c := ts.join(b)
		c.write("bye\xff")
		synctest.Wait()
		c.conn.Close()
		b.expect(c.says("bye\uFFFD"), c.offline())
	})
}

func TestOnlineOffline(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.connect()
		a.expect(a.online()) // the first line a newcomer gets is its own
		b := ts.join(a)
		c := ts.join(a, b)
		c.rename("carol")

		c.conn.Close()
		a.expect(c.offline())
		b.expect(c.offline())
		b.conn.Close()
		a.expect(b.offline())
		a.expectWho(a)
	})
}

func TestRenameTakesEffectAtOnce(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		b := ts.join(a)
		old := a.name
		a.expectWho(a, b) // the reply is kept until the names change
		a.send("rename|x", "hi", "who")
		a.name = "x"
		a.expect(r3+"x", a.says("hi"), b.whoLine(), a.whoLine())
		b.expect(a.says("hi")) // and not told of the rename itself
		b.sync()

		// The old name is free, the new one taken.
		b.send("to|"+old+"|x", "rename|x", "to|x|psst")
		b.expect(r5, r2)
		a.expect(b.name + "对您说:psst")
	})
}

func TestFramingOverPipe(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		b := ts.join(a)

		for _, c := range "byte by byte\r\n" {
			a.write(string(c))
		}
		a.expect(a.says("byte by byte"))
		b.expect(a.says("byte by byte"))

		// A last line without "\n" still counts when the client goes.
		a.write("last words")
		a.conn.Close()
		b.expect(a.says("last words"), a.offline())
	})
}

func TestLongLines(t *testing.T) {
	t.Parallel()
	max := strings.Repeat("x", maxLineBytes)
	text := func(s string) string { return "[" + addrA + "]" + addrA + ":" + s }
	tests := []struct {
		name   string
		writes []string // written one after another
		want   []string // what the sender then gets
	}{
		{"4096 bytes", []string{max + "\n"}, []string{text(max)}},
		{"4096 bytes and CRLF", []string{max + "\r\n"}, []string{text(max)}},
		{"4096 bytes, CR and LF apart", []string{max + "\r", "\n"}, []string{text(max)}},
		{"a second CR is content, then cleaned", []string{max[1:] + "\r\r\n"}, []string{text(max[1:])}},
		{"4097 bytes", []string{max + "y\n"}, []string{r7}},
		{"4097 bytes, CR at the limit", []string{max + "\ry\n"}, []string{r7}},
		{"many pieces, one R7", []string{max, "y", strings.Repeat("z", 10000), "\n"}, []string{r7}},
		{"two long lines, two R7", []string{max + "y\n" + max + "y\n"}, []string{r7, r7}},
		{"long line between short ones", []string{"a\n" + max + "yy\nb\n"}, []string{text("a"), r7, text("b")}},
		{"a line over many reads", []string{strings.Repeat("话", 1000) + "\n"}, []string{text(strings.Repeat("话", 1000))}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				ts := startPipe(t, Config{})
				a := ts.join()
				for _, w := range tt.writes {
					a.write(w)
				}
				a.expect(tt.want...)
				a.sync() // one R7 per line, and the connection stays
			})
		})
	}
}

// R7 comes as soon as the limit is passed, before the line ends.
func TestTooLongAnsweredAtOnce(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		a.write(strings.Repeat("x", maxLineBytes+1))
		a.expect(r7)
		a.write(strings.Repeat("x", 3*maxLineBytes) + "\nhi\n")
		a.expect(a.says("hi"))
	})
}

// ---- timers, under synctest: minutes run in no real time ----

func TestIdleKick(t *testing.T) {
	t.Parallel()
	const idle = 5 * time.Minute
	tests := []struct {
		name   string
		act    func(ts *testServer, a *client) // what a does (or gets) before the kick
		kickAt time.Duration
	}{
		{"silent", func(*testServer, *client) {}, idle},
		{"empty line counts", func(_ *testServer, a *client) {
			time.Sleep(2 * time.Minute)
			a.send("")
		}, 7 * time.Minute},
		{"partial line does not count", func(_ *testServer, a *client) {
			time.Sleep(2 * time.Minute)
			a.write("typing, not yet sent")
		}, idle},
		{"output received does not count", func(ts *testServer, a *client) {
			time.Sleep(time.Minute)
			b := ts.join(a)
			for range 3 {
				time.Sleep(time.Minute)
				b.send("hello")
				a.expect(b.says("hello"))
				b.expect(b.says("hello")) // b keeps reading, or it stalls
			}
			b.conn.Close()
			a.expect(b.offline())
		}, idle},
		{"over-long line counts when its newline arrives", func(_ *testServer, a *client) {
			time.Sleep(time.Minute)
			a.write(strings.Repeat("x", 2*maxLineBytes))
			a.expect(r7)
			time.Sleep(2 * time.Minute)
			a.write("\n")
		}, 8 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				start := time.Now()
				ts := startPipe(t, Config{Idle: idle})
				a := ts.join()
				tt.act(ts, a)
				// Well inside testTimeout, so a read deadline never ties with the kick.
				time.Sleep(tt.kickAt - time.Second - time.Since(start))
				watcher := ts.join(a)

				a.expect(r8)
				if got := time.Since(start); got != tt.kickAt {
					t.Errorf("kicked after %v, want %v", got, tt.kickAt)
				}
				a.expectClosed()
				watcher.expect(a.offline())
				watcher.expectWho(watcher) // no ghost
				ts.expectLogged("kick")
			})
		})
	}
}

func TestIdleZeroNeverKicks(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		time.Sleep(24 * time.Hour)
		a.sync()
	})
}

func TestShutdown(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		b := ts.join(a)
		deaf := ts.connect() // never reads: its writer is stuck from the start
		a.expect(deaf.online())
		b.expect(deaf.online())
		b.send("queued before the stop")
		a.expect(b.says("queued before the stop"))
		b.expect(b.says("queued before the stop"))

		start := time.Now()
		stopped := make(chan error, 1)
		go func() { stopped <- ts.stop() }()
		// What was queued comes first, then R10, then the close; nobody
		// is told that anyone left.
		for _, c := range []*client{a, b} {
			c.expect(r10)
			c.expectClosed()
		}
		if err := <-stopped; err != nil {
			t.Fatalf("Serve: %v", err)
		}
		// The deaf client held the stop up for its flush, and no longer.
		if got := time.Since(start); got != flushTimeout {
			t.Errorf("stop took %v, want %v", got, flushTimeout)
		}
		deaf.expectClosed()
		ts.expectLogged("shutdown")
		if strings.Contains(ts.logs.String(), "timed out") {
			t.Errorf("the stop timed out:\n%s", ts.logs.String())
		}
	})
}

// ---- limits ----

func TestMaxConns(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{MaxConns: 2})
		a := ts.join()
		b := ts.join(a)
		full := ts.connect()
		full.expect(r9)
		full.expectClosed()
		a.sync() // nobody else was told
		b.sync()

		b.conn.Close()
		a.expect(b.offline())
		c := ts.join(a) // the slot is free again
		c.expectWho(a, c)
	})
}

// A client that stops reading is dropped once 1 MiB waits for it; the
// others never wait and lose nothing, and what it held leaves the total.
func TestSlowReaderDropped(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		slow := ts.join() // reads nothing after this
		b := ts.join()
		c := ts.join(b)
		slowReaderRun(t, slow, b, c, 4000, maxQueuedBytes/4000+50)
		ts.expectLogged("disconnect", `reason="slow reader"`)
		synctest.Wait()
		if got := ts.srv.queued.Load(); got != 0 {
			t.Errorf("%d bytes still counted as waiting", got)
		}
	})
}

// slowReaderRun has b send lines of size bytes, at most limit of them,
// while b and c read everything, until both have seen slow go; then who
// must list b and c alone.
func slowReaderRun(t *testing.T, slow, b, c *client, size, limit int) {
	t.Helper()
	text := strings.Repeat("x", size)
	gone := map[*client]int{}
	sent := 0
	for ; sent < limit && (gone[b] == 0 || gone[c] == 0); sent++ {
		b.send(text)
		for _, r := range []*client{b, c} {
			for {
				line, err := r.readLine()
				if err != nil {
					t.Fatalf("%s after %d lines: %v", r.name, sent, err)
				}
				if line == slow.offline() {
					gone[r]++
					continue
				}
				if line != b.says(text) {
					t.Fatalf("%s got %.40q, want the text", r.name, line)
				}
				break
			}
		}
	}
	if gone[b] != 1 || gone[c] != 1 {
		t.Fatalf("after %d lines of %d bytes the slow reader's 已下线 came %d and %d times, want once each", sent, size, gone[b], gone[c])
	}
	b.expectWho(b, c)
}

// The bound counts what still waits, not what the client has already
// taken: a client that keeps reading is not dropped for a burst that,
// with what it has not read yet, stays under maxQueuedBytes.
func TestReadingClientNotDropped(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		c := ts.join(a)
		text := strings.Repeat("x", 4000)
		burst := func(n int) {
			for range n {
				c.send(text)
				c.expect(c.says(text))
			}
		}
		const lines = maxQueuedBytes / 5000 // about 800 KB
		burst(lines)
		for range lines * 3 / 4 {
			a.expect(c.says(text))
		}
		burst(lines * 3 / 4)
		for range lines { // the rest of the first lot, and the second
			a.expect(c.says(text))
		}
		a.sync()
		if strings.Contains(ts.logs.String(), "slow reader") {
			t.Errorf("a reading client was dropped:\n%s", ts.logs.String())
		}
	})
}

// A kicked user that reads no more has flushTimeout for its last flush
// (R8): then it is closed, not left to the stall's 2 minutes.
func TestKickedNonReaderFlushBounded(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		const idle = time.Minute
		ts := startPipe(t, Config{Idle: idle})
		ts.join() // reads its 已上线, then nothing
		time.Sleep(idle + flushTimeout)
		synctest.Wait()
		if !strings.Contains(ts.logs.String(), "reason=idle") {
			t.Errorf("not closed %v after the kick:\n%s", flushTimeout, ts.logs.String())
		}
	})
}

// A kicked client that does not read is kicked on time, though its writer
// is stuck in a write, and leaves who at once, not after its last flush
// gives up.
func TestKickedNonReaderLeavesAtOnce(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		const idle = time.Minute
		start := time.Now()
		ts := startPipe(t, Config{Idle: idle})
		var deaf []*client
		for range 5 {
			deaf = append(deaf, ts.connect()) // never reads, not even its 已上线
		}
		time.Sleep(idle - time.Second)
		watcher := ts.join()
		left := map[string]bool{}
		for range deaf {
			line, err := watcher.readLine()
			if err != nil {
				t.Fatal(err)
			}
			left[line] = true
		}
		if got := time.Since(start); got != idle {
			t.Errorf("left after %v, want %v", got, idle)
		}
		for _, d := range deaf {
			if !left[d.offline()] {
				t.Errorf("no %q", d.offline())
			}
		}
		watcher.expectWho(watcher)
	})
}

// A user whose connection takes none of its waiting output for
// stallTimeout is dropped then: 2 minutes after the last byte it took, or
// after its output began to wait if it took none. One that takes a little
// at a time, however slowly, stays.
func TestStalledReaderDropped(t *testing.T) {
	t.Parallel()
	text := strings.Repeat("x", 4000)
	tests := []struct {
		name string
		// What a takes of b's burst of 40 lines, which begins to wait for
		// a at start; it returns when a last took some, or when output
		// began to wait if it took none since; zero if a is never dropped.
		act func(a, b *client, start time.Time) time.Time
	}{
		{"takes nothing", func(_, _ *client, start time.Time) time.Time { return start }},
		{"takes a line at once, then nothing", func(a, b *client, _ time.Time) time.Time {
			a.expect(b.says(text))
			return time.Now()
		}},
		{"takes a line a minute in, then nothing", func(a, b *client, _ time.Time) time.Time {
			time.Sleep(time.Minute)
			a.expect(b.says(text))
			return time.Now()
		}},
		{"takes it all a minute in, then more waits from 90 s", func(a, b *client, _ time.Time) time.Time {
			time.Sleep(time.Minute)
			for range 40 {
				a.expect(b.says(text))
			}
			time.Sleep(30 * time.Second)
			b.send("more")
			b.expect(b.says("more"))
			return time.Now()
		}},
		{"takes a line every 30 s", func(a, b *client, _ time.Time) time.Time {
			for range 40 {
				time.Sleep(30 * time.Second)
				a.expect(b.says(text))
			}
			a.sync()
			return time.Time{}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				ts := startPipe(t, Config{})
				a := ts.join()
				b := ts.join(a)
				start := time.Now()
				for range 40 { // 160 KB
					b.send(text)
					b.expect(b.says(text))
				}
				last := tt.act(a, b, start)
				if last.IsZero() {
					b.expectWho(a, b)
					return
				}
				time.Sleep(time.Until(last.Add(stallTimeout - time.Second)))
				b.expectWho(a, b) // not before
				b.expect(a.offline())
				if got := time.Since(last); got != stallTimeout {
					t.Errorf("dropped %v after a last took some, want %v", got, stallTimeout)
				}
				ts.expectLogged("disconnect", "reason=stalled")
			})
		})
	}
}

// A user waiting for its kick costs nothing while nothing happens, though
// output for it waits: its writer waits in one write, and does not spin
// (as it did when a write's deadline was the kick's time, which the
// user's last line had moved). Real time: a spinning server would stop
// synctest's clock, and hang the test rather than fail it.
func TestNoSpinBeforeTheKick(t *testing.T) {
	t.Parallel()
	const idle = 2 * time.Second
	ts := startPipe(t, Config{Idle: idle})
	a := ts.join() // reads nothing after this
	b := ts.join(a)
	start := time.Now()
	a.send("first")
	b.send("") // b is not kicked before a
	b.expect(a.says("first"))
	time.Sleep(time.Until(start.Add(idle / 2)))
	a.send("second") // the kick is now at 3 s
	b.send("")
	b.expect(a.says("second"))
	time.Sleep(time.Until(start.Add(idle + idle/10))) // past the first line's kick time
	before := ts.ln.writes.Load()
	b.send("for a, who does not read")
	for seen := 0; seen < 2; seen++ { // the line, and a's 已下线, in either order
		if line, err := b.readLine(); err != nil || line != b.says("for a, who does not read") && line != a.offline() {
			t.Fatalf("got %q, %v", line, err)
		}
	}
	if writes := ts.ln.writes.Load() - before; writes > 10 {
		t.Errorf("%d writes while a waited for its kick, want a few", writes)
	}
	if elapsed := time.Since(start); elapsed < idle+idle/2 {
		t.Errorf("kicked after %v, want %v", elapsed, idle+idle/2)
	}
}

// ---- the room: who is in it ----

// recordConn is a connection that takes every write at once and keeps it;
// reads wait until it is closed.
type recordConn struct {
	fakeConn
	mu sync.Mutex
	b  bytes.Buffer
}

// fakeConn is the part of a net.Conn the in-process fakes share: reads
// wait for Close, deadlines are ignored.
type fakeConn struct {
	addr   net.Addr
	closed chan struct{}
	once   sync.Once
}

func newFake(port int) fakeConn {
	return fakeConn{addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}, closed: make(chan struct{})}
}

func newRecord(port int) *recordConn {
	return &recordConn{fakeConn: newFake(port)}
}

func (c *recordConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.Write(p)
}

func (c *recordConn) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.b.String()
}

func (c *fakeConn) Read([]byte) (int, error) {
	<-c.closed
	return 0, io.EOF
}

func (c *fakeConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

func (c *fakeConn) LocalAddr() net.Addr              { return c.addr }
func (c *fakeConn) RemoteAddr() net.Addr             { return c.addr }
func (c *fakeConn) SetDeadline(time.Time) error      { return nil }
func (c *fakeConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fakeConn) SetWriteDeadline(time.Time) error { return nil }

// stagedUser is a user on a recordConn, for the tests that hand out the
// hub's messages themselves, one at a time.
func stagedUser(s *Server, port int) (*User, *recordConn) {
	c := newRecord(port)
	return newUser(s, c, keyOf(c.addr)), c
}

func joinMessage(u *User) message {
	return message{kind: msgJoin, from: u, line: u.userLine([]byte("已上线"))}
}

// The hub decides who is in the room, and a user that left is out for
// good: a rename or a line of its own that was on its way when it left
// changes nothing and reaches nobody; and who and to| agree at every step,
// a newcomer included. The test hands out the messages itself.
func TestLeftIsGone(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		s := NewServer(slog.New(slog.DiscardHandler), Config{})
		a, _ := stagedUser(s, 10001)
		b, bconn := stagedUser(s, 10002)
		s.handOut(joinMessage(a))
		if s.lookup([]byte(b.Name)) != nil || strings.Contains(string(s.who().b), b.Name) {
			t.Fatal("who or to| finds a newcomer before its join is handed out")
		}
		s.handOut(joinMessage(b))
		if s.lookup([]byte(b.Name)) != b || !strings.Contains(string(s.who().b), b.Name) {
			t.Fatal("who or to| does not find a user whose join was handed out")
		}
		if err := s.rename(a, "alice"); err != nil {
			t.Fatal(err)
		}
		inFlight := a.userLine([]byte("sent as a was kicked"))
		a.leave(reasonIdle, nil)
		s.handOut(message{kind: msgLeave, from: a})
		// What was on its way.
		if err := s.rename(a, "ghost"); err != errGone {
			t.Errorf("a rename after leaving: %v, want errGone", err)
		}
		s.handOut(message{kind: msgAll, from: a, line: inFlight})
		s.handOut(message{kind: msgTo, from: a, to: b, line: &line{b: []byte("alice对您说:late\n")}})
		synctest.Wait()
		want := "[127.0.0.1:10002]127.0.0.1:10002:已上线\n[127.0.0.1:10001]alice:已下线\n"
		if got := bconn.String(); got != want {
			t.Errorf("b got %q, want %q", got, want)
		}
		for _, name := range []string{"alice", "ghost"} {
			if s.lookup([]byte(name)) != nil || strings.Contains(string(s.who().b), name) {
				t.Errorf("%s is still found after a left", name)
			}
		}
		if err := s.rename(b, "alice"); err != nil {
			t.Errorf("the name of a user that left is still taken: %v", err)
		}
	})
}

// The same, as it happens: a rename and a line arrive at the instant of
// the kick. Whichever comes first (the kick at once, or a minute later),
// nothing of the user comes after its 已下线, and its name is free.
func TestKickRaces(t *testing.T) {
	t.Parallel()
	for i := range 20 {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				const idle = time.Minute
				ts := startPipe(t, Config{Idle: idle})
				w := ts.join()
				a := ts.join(w)
				go io.Copy(io.Discard, a.conn)
				time.Sleep(idle / 2)
				w.send("") // w is kicked later than a
				time.Sleep(idle / 2)
				a.conn.SetWriteDeadline(time.Now().Add(testTimeout))
				io.WriteString(a.conn, "rename|ghost\nhello\n")
				for end := time.Now().Add(3 * idle); ; {
					w.conn.SetReadDeadline(time.Now().Add(idle / 4))
					line, err := w.r.ReadString('\n')
					if errors.Is(err, os.ErrDeadlineExceeded) && time.Now().Before(end) {
						w.send("") // w is not kicked meanwhile
						continue
					}
					if err != nil {
						t.Fatal(err)
					}
					if strings.HasSuffix(line, ":已下线\n") {
						break
					}
					if line != a.says("hello")+"\n" && line != "["+a.addr+"]ghost:hello\n" {
						t.Fatalf("w got %q", line)
					}
				}
				w.expectWho(w)
				w.rename("ghost")
			})
		})
	}
}

// A server on 0.0.0.0, reached on two local addresses, can see two
// connections from one remote address and port: the second gets R11 while
// the first holds that address as its name, and nobody is listed twice,
// or stays listed after leaving.
func TestTCPOneAddressTwice(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp4", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	ts := startServer(t, ln, Config{})
	port := ln.Addr().(*net.TCPAddr).Port
	reuse := func(network, address string, c syscall.RawConn) error {
		var err error
		c.Control(func(fd uintptr) { err = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1) })
		return err
	}
	dial := func(server string, local *net.TCPAddr) *client {
		d := net.Dialer{Timeout: testTimeout, LocalAddr: local, Control: reuse}
		c, err := d.Dial("tcp4", net.JoinHostPort(server, strconv.Itoa(port)))
		if err != nil {
			t.Fatal(err)
		}
		return ts.newClient(c, c.LocalAddr().String(), nil)
	}
	first := dial("127.0.0.1", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	first.expect(first.online())
	second := dial("127.0.0.2", first.conn.LocalAddr().(*net.TCPAddr))
	second.expect(r11)
	second.expectEOF()
	other := dial("127.0.0.1", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	other.expect(other.online())
	first.expect(other.online())
	first.expectWho(first, other)
	first.conn.Close()
	other.expect(first.offline())
	other.expectWho(other)
	ts.expectLogged("disconnect", `reason="address held by a user"`)
}

// ---- fair use ----

// A client that writes 1,000 lines at once has them run at the pace its
// budget allows: 20 at once, then 5 a second, every one in order, replies
// included, at exactly those instants.
func TestFloodControl(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{Rate: 5})
		a := ts.join()
		start := time.Now()
		var lines []string
		for i := range 1000 {
			if i%100 == 99 {
				lines = append(lines, "to|") // a command, answered in its turn
			} else {
				lines = append(lines, fmt.Sprintf("line %d", i))
			}
		}
		go writeAll(a.conn, strings.Join(lines, "\n")+"\n")
		for i, line := range lines {
			want := a.says(line)
			if line == "to|" {
				want = r4
			}
			a.expect(want)
			if got, at := time.Since(start), time.Duration(max(0, i-19))*200*time.Millisecond; got != at {
				t.Fatalf("line %d ran after %v, want %v", i, got, at)
			}
		}
		a.sync()
	})
}

// With -rate 0 the same lines all run at once.
// Without flood control only its readers hold a sender back: one that
// outruns a user who reads, slowly, waits for it (Server.keepUp), rather
// than get it dropped by broadcasts or get R12 for its whispers.
func TestSendersWaitWithoutFloodControl(t *testing.T) {
	t.Parallel()
	for _, whisper := range []bool{false, true} {
		t.Run(map[bool]string{false: "broadcast", true: "whisper"}[whisper], func(t *testing.T) {
			t.Parallel()
			synctest.Test(t, func(t *testing.T) {
				ts := startPipe(t, Config{})
				r := ts.join() // reads a line every 10 ms: 400 KB/s
				a := ts.join(r)
				const lines = 2 * maxQueuedBytes / 4000
				var send strings.Builder
				want := make([]string, lines)
				for i := range lines {
					text := fmt.Sprintf("%04d%s", i, strings.Repeat("x", 3996))
					want[i] = a.says(text)
					if whisper {
						text, want[i] = "to|"+r.name+"|"+text, a.name+"对您说:"+text
					}
					send.WriteString(text + "\n")
				}
				go writeAll(a.conn, send.String())
				echoes := make(chan error, 1)
				go func() { // a reads its own lines at full speed
					var err error
					for i := 0; i < lines && !whisper && err == nil; i++ {
						_, err = a.readLine()
					}
					echoes <- err
				}()
				for i := range lines {
					time.Sleep(10 * time.Millisecond)
					r.expect(want[i])
				}
				if err := <-echoes; err != nil {
					t.Fatal(err)
				}
				a.sync() // and no R12
				r.sync()
			})
		})
	}
}

func TestFloodControlOff(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		start := time.Now()
		go writeAll(a.conn, strings.Repeat("x\n", 1000))
		for range 1000 {
			a.expect(a.says("x"))
		}
		if got := time.Since(start); got != 0 {
			t.Errorf("1,000 lines took %v without flood control", got)
		}
	})
}

// Whispers to oneself, once handed out, are no longer on their way: a user
// that read 40 KB of them is not behind, and no broadcast waits for it.
func TestWhispersToSelfNotBehind(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		b := ts.join(a)
		a.rename("alice")
		text := strings.Repeat("y", 4000)
		for range 10 {
			a.send("to|alice|" + text)
			a.expect("alice对您说:" + text)
		}
		start := time.Now()
		b.send("hi", "again")
		a.expect(b.says("hi"), b.says("again"))
		b.expect(b.says("hi"), b.says("again"))
		if got := time.Since(start); got != 0 {
			t.Errorf("broadcasts waited %v for a user that reads all it gets", got)
		}
	})
}

func TestLineCost(t *testing.T) {
	t.Parallel()
	s := NewServer(slog.New(slog.DiscardHandler), Config{})
	tests := []struct {
		kind   cmdKind
		size   int // bytes as received
		online int64
		want   int
	}{
		{cmdEmpty, 0, 1, 1},
		{cmdText, 1, 1, 1},
		{cmdText, 512, 1, 1},
		{cmdText, 513, 1, 2},
		{cmdText, maxLineBytes, 1, 8},
		{cmdTo, maxLineBytes, 1, 8},
		{cmdWho, 3, 1, 1},
		{cmdWho, 3, 500, 1},
		{cmdWho, 3, 501, 2},
		{cmdWho, 3, 1200, 3},
		{cmdWho, 3, 10000, 20},
	}
	for _, tt := range tests {
		s.conns.Store(tt.online)
		if got := s.cost(tt.kind, tt.size); got != tt.want {
			t.Errorf("cost of a %d-byte line of kind %d with %d online = %d, want %d", tt.size, tt.kind, tt.online, got, tt.want)
		}
	}
}

// What each kind of line costs, seen at the instants it runs: a 4096-byte
// line 8, who in a room of 1,200 3, a 4098-byte line 9, the rest 1.
func TestCostsPaced(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{Rate: 5})
		a := ts.join()
		ts.srv.conns.Add(1199) // a room of 1,200, for who's cost
		start := time.Now()
		long := strings.Repeat("x", maxLineBytes)
		steps := []struct {
			send string
			want []string
			at   time.Duration // the budget starts at 20, and gets a unit back each 200 ms
		}{
			{long + "\n", []string{a.says(long)}, 0},               // 12 left
			{long + "\n", []string{a.says(long)}, 0},               // 4 left
			{"who\n", []string{a.whoLine()}, 0},                    // 1 left
			{long + "yy\n", []string{r7}, 1600 * time.Millisecond}, // 9: waits for 8
			{"\nto|\n", []string{r4}, 2000 * time.Millisecond},     // 1 and 1
		}
		for _, st := range steps {
			go writeAll(a.conn, st.send)
			a.expect(st.want...)
			if got := time.Since(start); got != st.at {
				t.Fatalf("after %.20q: answered at %v, want %v", st.send, got, st.at)
			}
		}
	})
}

// Every byte of an over-long line is paced as a line's are, however long
// it goes on: 20 KB cost 40 units, so the line after it runs at 4.2 s, and
// meanwhile nothing more is read. (One write: two writers of one pipe
// would wait on its lock, which stops synctest's clock.)
func TestOverLongLinePaced(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{Rate: 5})
		a := ts.join()
		start := time.Now()
		go writeAll(a.conn, strings.Repeat("x", 20<<10)+"\nhi\n")
		a.expect(r7)
		if got := time.Since(start); got != 0 {
			t.Errorf("R7 after %v, want at once", got)
		}
		a.expect(a.says("hi"))
		if got, want := time.Since(start), 4200*time.Millisecond; got != want {
			t.Errorf("the next line ran after %v, want %v", got, want)
		}
	})
}

// Telnet's bytes cost as a line's do: 20 KB of IAC NOP without a newline
// cost 40 units, so the line after them runs at 4.2 s.
func TestTelnetBytesPaced(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{Rate: 5})
		a := ts.join()
		start := time.Now()
		go writeAll(a.conn, strings.Repeat("\xff\xf1", 10<<10)+"hi\n")
		a.expect(a.says("hi"))
		if got, want := time.Since(start), 4200*time.Millisecond; got != want {
			t.Errorf("the line after 20 KB of telnet commands ran after %v, want %v", got, want)
		}
	})
}

// A line that waits for its budget counts as activity when it arrives,
// and a stop while lines wait still gives R10 at once.
func TestPacedLinesAndTheClock(t *testing.T) {
	t.Parallel()
	t.Run("idle kick", func(t *testing.T) {
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			const idle = 10 * time.Second
			ts := startPipe(t, Config{Rate: 5, Idle: idle})
			a := ts.join()
			start := time.Now()
			go writeAll(a.conn, strings.Repeat("x\n", 40))
			for range 40 {
				a.expect(a.says("x"))
			}
			// The last line arrived when the one before it ran, at 19×200 ms;
			// it ran at 4 s.
			a.expect(r8)
			if got, want := time.Since(start), 3800*time.Millisecond+idle; got != want {
				t.Errorf("kicked after %v, want %v", got, want)
			}
		})
	})
	t.Run("stop", func(t *testing.T) {
		t.Parallel()
		synctest.Test(t, func(t *testing.T) {
			ts := startPipe(t, Config{Rate: 5})
			a := ts.join()
			go writeAll(a.conn, strings.Repeat("x\n", 100))
			for range 25 { // 20, then 5 in the next second
				a.expect(a.says("x"))
			}
			stopped := time.Now()
			go ts.stop()
			a.expect(r10)
			if got := time.Since(stopped); got != 0 {
				t.Errorf("R10 came %v after the stop", got)
			}
			a.expectClosed()
		})
	})
}

// writeAll writes s to conn with no deadline: for the tests whose server
// reads it as slowly as flood control allows. The connection's end ends it.
func writeAll(conn net.Conn, s string) {
	conn.SetWriteDeadline(time.Time{})
	io.WriteString(conn, s)
}

// At most -max-conns-per-ip users at once from one address; the next gets
// R11 and is closed, while another address gets in; a slot frees when a
// user leaves.
func TestConnsPerAddress(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{MaxConnsPerIP: 16})
		var users []*client
		for range 16 {
			users = append(users, ts.joinFrom("10.0.0.1"))
		}
		over := ts.connectFrom("10.0.0.1")
		over.expect(r11)
		over.expectClosed()
		other := ts.joinFrom("10.0.0.2")
		users[0].conn.Close()
		other.expect(users[0].offline())
		ts.joinFrom("10.0.0.1", other) // the slot is free again
		ts.expectLogged("reject", `reason="too many users from the address"`)
	})
}

// An address may open 2N connections at once, then N a minute: a bucket
// of 32 refilled at one each 3.75 s, seen at those instants.
func TestConnectBucket(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{MaxConnsPerIP: 16})
		visit := func() bool { // connect, then leave; reports whether it got in
			c := ts.connectFrom("10.0.0.1")
			line, err := c.readLine()
			c.conn.Close()
			synctest.Wait() // it left
			switch {
			case err == nil && line == c.online():
				return true
			case err == nil && line == r11:
				return false
			}
			t.Fatalf("got %q, %v", line, err)
			return false
		}
		for i := range 32 {
			if !visit() {
				t.Fatalf("connection %d of the first 32 turned away", i+1)
			}
		}
		if visit() {
			t.Fatal("connection 33 got in at once")
		}
		const every = time.Minute / 16
		for range 3 {
			time.Sleep(every - time.Nanosecond)
			if visit() {
				t.Fatal("got in before the bucket had one back")
			}
			time.Sleep(time.Nanosecond)
			if !visit() {
				t.Fatal("turned away when the bucket had one back")
			}
		}
		ts.joinFrom("10.0.0.2") // another address has its own bucket
	})
}

// Two IPv6 addresses in one /64 are one address.
func TestConnsPerAddressIPv6(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{MaxConnsPerIP: 1})
		ts.joinFrom("2001:db8::1")
		same := ts.connectFrom("2001:db8::2")
		same.expect(r11)
		ts.joinFrom("2001:db8:0:1::1")
	})
}

// A rejected connection is held at most a second, and at most 64 are held
// at once; past that the reply is written and the connection closed at
// once. Rejections are logged once a second for each reason, with their
// count.
func TestRejectsAreCheap(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{MaxConns: 1})
		ts.join()
		var held []*client
		for range 100 { // they read nothing
			held = append(held, ts.connect())
		}
		synctest.Wait()
		if got := ts.srv.rejecting.Load(); got != maxRejecting {
			t.Fatalf("%d rejected connections held, want %d", got, maxRejecting)
		}
		time.Sleep(lingerTimeout)
		synctest.Wait()
		if got := ts.srv.rejecting.Load(); got != 0 {
			t.Fatalf("%d rejected connections held after %v", got, lingerTimeout)
		}
		for _, c := range held {
			c.expectClosed() // pipes keep nothing: R9 is lost if nobody reads it
		}
		ts.expectLogged("reject", `reason="server full" count=100`)
		if logs := ts.logs.String(); strings.Count(logs, "msg=reject ") != 1 {
			t.Errorf("want one reject line for the 100:\n%s", logs)
		}
		if got := ts.srv.rejected.Get("server full").String(); got != "100" {
			t.Errorf("rejects counted %s, want 100", got)
		}
	})
}

// The log keeps each kind of event to logBurst lines a second, and then
// logs the count of the rest, a line a second.
func TestLogBurst(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		a := ts.join()
		for i := range 100 {
			a.rename(fmt.Sprint("n", i))
		}
		a.expectWho(a) // a second of renames, and another
		time.Sleep(time.Second)
		a.rename("last")
		time.Sleep(2 * time.Second)
		logs := ts.logs.String()
		if n := strings.Count(logs, "msg=rename addr="); n != logBurst+1 {
			t.Errorf("%d rename lines, want %d:\n%s", n, logBurst+1, logs)
		}
		if !strings.Contains(logs, "msg=rename more=95") {
			t.Errorf("no count of the 95 others:\n%s", logs)
		}
	})
}

// While all users' waiting output passes 256 MiB, each user's bound is
// 64 KiB, who replies included, and 1 MiB again once it falls back. A user
// that keeps up is not dropped; what a dropped user held leaves the total
// at once.
func TestTightBound(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		b := ts.join()
		text := strings.Repeat("x", 4000)
		burst := func() { // 80 KB for everyone
			for range 20 {
				b.send(text)
				b.expect(b.says(text))
			}
		}
		behind := ts.join(b) // reads nothing from now on
		burst()
		b.expectWho(b, behind) // 80 KB behind, under 1 MiB: still there
		behind.send("who")     // a line of its own, counted in the total
		synctest.Wait()
		if ts.srv.queued.Load() == 0 {
			t.Fatal("behind's who reply is not counted")
		}
		ts.srv.queued.Add(maxQueuedTotal + 1) // as if everyone were behind
		b.send("hi")
		b.expect(b.says("hi"), behind.offline())
		ts.expectLogged("disconnect", `reason="slow reader"`)
		synctest.Wait() // the writers that wrote what b read have returned
		if got := ts.srv.queued.Load() - maxQueuedTotal - 1; got != 0 {
			t.Errorf("%d bytes still counted once behind was dropped", got)
		}

		// A who reply of 80 KB is more than the tight bound: the user that
		// asks for it while the total is over is dropped, not given it.
		s := ts.srv
		s.mu.Lock()
		for i := range 500 {
			name := fmt.Sprintf("%s%03d", strings.Repeat("名", 40), i) // 160 bytes a line
			s.OnlineMap[nameKey(name)] = &User{Name: name, Addr: "10.0.0.9:1"}
		}
		s.whoReply = nil
		s.mu.Unlock()
		asker := ts.join(b)
		asker.send("who")
		b.expect(asker.offline())
		ts.srv.queued.Add(-maxQueuedTotal - 1)
		again := ts.join(b)
		again.send("who")
		for range 502 {
			if _, err := again.readLine(); err != nil {
				t.Fatal(err)
			}
		}
		again.sync()
		b.sync()
	})
}

// A whisper to a user more than 64 KiB behind gets R12 and is not queued,
// after the other checks of to|.
func TestWhisperToSomeoneBehind(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		alice := ts.join()
		alice.rename("alice")
		bob := ts.join(alice)
		bob.rename("bob")
		text := strings.Repeat("x", 4000)
		for range 17 { // 68 KB of whispers that alice does not read
			bob.send("to|alice|" + text)
		}
		bob.send("to|nobody|x", "to|alice|", "to|alice|one more", "to|bob|me")
		bob.expect(r5, r6, r12, "bob对您说:me")
		for range 17 {
			alice.expect("bob对您说:" + text)
		}
		alice.sync() // and not the one more
		bob.send("to|alice|now")
		alice.expect("bob对您说:now")
	})
}

// ---- names ----

func TestValidName(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		ok   bool
	}{
		{"bob", true},
		{"bob_2", true},
		{"张三", true},
		{"小明abc", true},
		{"日本語のテスト", true},
		{"ハリー", true}, // ー is a Common-script letter that Japanese needs
		{"김철수", true},
		{"Ана", true},
		{"Ωμέγα", true},
		{"😀smile", true},
		{"ㄅㄆㄇ注音", true}, // Bopomofo with Han
		{"josé", true},
		{"é" + strings.Repeat("é", 31), true},
		{"a\u0915\u094d", false}, // a mark after a letter of another script than the first
		{"\u0915\u094d\u0937", true},
		{strings.Repeat("é", 33), false},
		{"", false},
		{"a b", false},
		{"a\u00a0b", false},
		{"a\u2028b", false},
		{"a\u3000b", false},
		{"a|b", false},
		{"a:b", false},
		{"[b", false},
		{"b]", false},
		{"127.0.0.1:5", false},
		{"[::1]:5", false},
		{"［127.0.0.1：1］x", false},
		{"a\x01b", false},
		{"a\xffb", false},
		{"alice\u200b", false}, // zero-width space (Cf)
		{"ali\u200dce", false}, // zero-width joiner
		{"a\u00adb", false},    // soft hyphen
		{"\ufeffbob", false},   // byte order mark
		{"bob\u202e", false},   // right-to-left override
		{"a\ue000", false},     // private use (Co)
		{"a\u0378", false},     // unassigned (Cn)
		{"\u0301a", false},     // starts with a combining mark
		{"e\u0301", false},     // a combining mark after a Latin letter
		{"jose\u0301", false},
		{"a\u115fb", false}, {"a\u1160b", false}, {"a\u3164b", false}, {"a\uffa0b", false}, {"a\u2800b", false}, // blank fillers
		{"a｜b", false}, {"a∣b", false}, {"a：b", false}, {"a∶b", false}, {"a꞉b", false}, {"aːb", false},
		{"a˸b", false}, {"a﹕b", false}, {"a︓b", false}, {"a։b", false}, {"a׃b", false}, {"a［b", false}, {"a］b", false},
		// The look-alikes an audit made with alice online.
		{"𝚊𝚕𝚒𝚌𝚎", false}, {"𝖺𝗅𝗂𝖼𝖾", false}, // mathematical letters: Common script
		{"alice\u034f", false}, {"alice\ufe0f", false}, {"alice\ufe00", false}, {"alice\U000e0100", false}, {"alice\ufffc", false},
		{"al\u034fice", false},
		{"127.0.0.1፡54321", false}, {"127.0.0.1⁚54321", false}, {"127.0.0.1ꓽ54321", false}, {"127.0.0.1︰54321", false},
		{"⟦127.0.0.1⁚1⟧alice", false}, {"bobǀx", false},
		{"аlice", false}, // a Cyrillic а among Latin letters
		{"Ωmega", false},
		{"小明Ана", false},
		{"김ひ", false},
	}
	for _, tt := range tests {
		if got := validName([]byte(tt.name)); got != tt.ok {
			t.Errorf("validName(%q) = %v, want %v", tt.name, got, tt.ok)
		}
	}
}

func TestNameKey(t *testing.T) {
	t.Parallel()
	for _, same := range [][]string{
		{"alice", "Alice", "ALICE", "ａｌｉｃｅ", "Ａｌｉｃｅ", "ɑlice", "alıce", "aⅼice", "aʟice", "аӏісе", "АӀІСЕ"},
		{"straße", "STRAßE"},
		{"Σίσυφος", "ΣΊΣΥΦΟΣ", "σίσυφοσ", "σίσυφος"},
		{"ivan", "Іvan", "іvan", "IVAN"},
		{"127.0.0.1:5", "127.0.0.1:5"},
	} {
		for _, name := range same[1:] {
			if nameKey(name) != nameKey(same[0]) {
				t.Errorf("%q and %q are not the same name", name, same[0])
			}
		}
	}
	for _, pair := range [][2]string{{"alice", "alicf"}, {"bob", "bob2"}, {"bob1", "bobl"}, {"josé", "jose"}} {
		if nameKey(pair[0]) == nameKey(pair[1]) {
			t.Errorf("%q and %q are the same name", pair[0], pair[1])
		}
	}
}

// With alice and josé online, no look-alike of either is a name anyone can
// take: each gets R2 (the same name) or R1 (not a name); and to| finds
// alice by any of her look-alikes.
func TestNamesUnique(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{})
		alice := ts.join()
		alice.rename("alice")
		jose := ts.join(alice)
		jose.rename("josé")
		m := ts.join(alice, jose)
		for _, name := range []string{"Alice", "ALICE", "ａｌｉｃｅ", "alice", "ɑlice", "alıce", "aⅼice", "aʟice", "аӏісе", "JOSÉ"} {
			m.send("rename|" + name)
			m.expect(r2)
		}
		for _, name := range []string{"𝚊𝚕𝚒𝚌𝚎", "𝖺𝗅𝗂𝖼𝖾", "alice\u034f", "alice\ufe0f", "alice\ufe00", "alice\U000e0100", "alice\ufffc",
			"al\u034fice", "jose\u0301", "alice\u200b", "bobǀx"} {
			m.send("rename|" + name)
			m.expect(r1)
		}
		m.send("to|ɑlice|x", "to|аӏісе|y", "to|JOSÉ|z")
		alice.expect(m.name+"对您说:x", m.name+"对您说:y")
		jose.expect(m.name + "对您说:z")
		m.rename("Alicia")
		// Held by any online user, the sender included: its own name in
		// other letters too.
		alice.send("rename|ALICIA", "rename|Alice")
		alice.expect(r2, r2)
	})
}

// ---- TLS ----

// testTLS makes a self-signed certificate for localhost and 127.0.0.1,
// valid from 1999 (synctest's clock starts in 2000) to 2100, and returns
// the configurations of a server that has it and of a client that trusts
// it.
func testTLS(tb testing.TB) (server, client *tls.Config, certPEM, keyPEM []byte) {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "chat test"},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Date(1999, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:     time.Date(2100, 1, 1, 0, 0, 0, 0, time.UTC),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		tb.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	server = &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}, MinVersion: tls.VersionTLS12}
	client = &tls.Config{RootCAs: pool, ServerName: "localhost"}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	return server, client, certPEM, keyPEM
}

// connectTLS connects over TLS and reads nothing after the handshake.
func (ts *testServer) connectTLS(cfg *tls.Config) *client {
	ts.tb.Helper()
	c := ts.connect()
	tc := tls.Client(c.conn, cfg)
	tc.SetDeadline(time.Now().Add(testTimeout))
	if err := tc.Handshake(); err != nil {
		ts.tb.Fatalf("handshake: %v", err)
	}
	c.conn, c.r = tc, bufio.NewReader(tc)
	return c
}

// joinTLS connects over TLS and waits until the user, and each of others,
// has seen it come online.
func (ts *testServer) joinTLS(cfg *tls.Config, others ...*client) *client {
	ts.tb.Helper()
	c := ts.connectTLS(cfg)
	c.expect(c.online())
	for _, o := range others {
		o.expect(c.online())
	}
	return c
}

// Everything works over TLS as without it: joins, text, who, whispers,
// R7, the idle kick at its instant, R10 at the stop, and a half-close
// that still gets its replies.
func TestTLS(t *testing.T) {
	t.Parallel()
	serverTLS, clientTLS, _, _ := testTLS(t)
	synctest.Test(t, func(t *testing.T) {
		const idle = 5 * time.Minute
		ts := startPipe(t, Config{Idle: idle, TLS: serverTLS})
		start := time.Now()
		a := ts.joinTLS(clientTLS)
		b := ts.joinTLS(clientTLS, a)
		a.rename("alice")
		b.rename("bob")
		a.send("hello")
		a.expect(a.says("hello"))
		b.expect(a.says("hello"))
		b.send("who", "to|alice|psst")
		b.expect(a.whoLine(), b.whoLine())
		a.expect("bob对您说:psst")
		a.send(strings.Repeat("x", maxLineBytes+1))
		a.expect(r7)

		// b half-closes (close_notify) after a last line: its replies come.
		b.send("who")
		if err := b.conn.(*tls.Conn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		b.expect(a.whoLine(), b.whoLine())
		b.expectClosed()
		a.expect(b.offline())

		time.Sleep(time.Minute)
		c := ts.joinTLS(clientTLS, a)        // kicked a minute after a
		time.Sleep(idle - time.Since(start)) // a's last line came at start
		a.expect(r8)
		if got := time.Since(start); got != idle {
			t.Errorf("kicked after %v, want %v", got, idle)
		}
		a.expectClosed()
		c.expect(a.offline())
		go ts.stop()
		c.expect(r10)
		c.expectClosed()
	})
}

// A client that does not speak TLS to a TLS server is closed, told
// nothing: at once if it sends something else, or after handshakeTimeout
// if it sends nothing; its slot is free again.
func TestTLSPlainClient(t *testing.T) {
	t.Parallel()
	serverTLS, clientTLS, _, _ := testTLS(t)
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{MaxConns: 1, TLS: serverTLS})
		start := time.Now()
		silent := ts.connect()
		time.Sleep(handshakeTimeout - time.Second) // so that its read's deadline comes after
		silent.expectClosed()
		if got := time.Since(start); got != handshakeTimeout {
			t.Errorf("closed after %v, want %v", got, handshakeTimeout)
		}
		plain := ts.connect()
		go writeAll(plain.conn, "hello\n")
		for {
			line, err := plain.readLine() // a TLS alert, if anything: no chat line
			if err != nil {
				break
			}
			if strings.ContainsFunc(line, unicode.IsLetter) { // an alert has none; R9 or 已上线 would
				t.Fatalf("a plain client got %q", line)
			}
		}
		ts.joinTLS(clientTLS) // the one slot was freed both times
		ts.expectLogged("disconnect", `reason="tls handshake failed"`)
		if got := ts.srv.left.Get("tls handshake failed").String(); got != "2" {
			t.Errorf("tls_handshakes_failed = %v, want 2", got)
		}
	})
}

// A TLS connection turned away gets its reply over TLS, after the
// handshake.
func TestTLSTurnedAway(t *testing.T) {
	t.Parallel()
	serverTLS, clientTLS, _, _ := testTLS(t)
	for _, tt := range []struct {
		cfg   Config
		reply string
	}{
		{Config{MaxConns: 1, TLS: serverTLS}, r9},
		{Config{MaxConnsPerIP: 1, TLS: serverTLS}, r11},
	} {
		synctest.Test(t, func(t *testing.T) {
			ts := startPipe(t, tt.cfg)
			ts.joinTLS(clientTLS)
			over := ts.connectTLS(clientTLS)
			over.expect(tt.reply)
			over.expectClosed()
		})
	}
}

// At most maxHandshakes TLS handshakes run at once: past that a new
// connection is closed at once, and each ends after handshakeTimeout.
func TestTLSHandshakesBounded(t *testing.T) {
	t.Parallel()
	serverTLS, _, _, _ := testTLS(t)
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{TLS: serverTLS})
		var silent []*client
		for range maxHandshakes { // none sends its ClientHello
			silent = append(silent, ts.connect())
		}
		synctest.Wait()
		if got := ts.srv.handshaking.Load(); got != maxHandshakes {
			t.Fatalf("%d handshakes in progress, want %d", got, maxHandshakes)
		}
		start := time.Now()
		ts.connect().expectClosed()
		if got := time.Since(start); got != 0 {
			t.Errorf("the connection past the bound was closed after %v, want at once", got)
		}
		ts.expectLogged("disconnect", `reason="tls handshake failed"`, "too many handshakes")
		time.Sleep(handshakeTimeout - time.Since(start))
		for _, c := range silent {
			c.expectClosed()
		}
		if got := time.Since(start); got != handshakeTimeout {
			t.Errorf("the handshakes ended after %v, want %v", got, handshakeTimeout)
		}
		if got := ts.srv.handshaking.Load(); got != 0 {
			t.Errorf("%d handshakes still counted", got)
		}
	})
}

// A TLS user that stops reading holds the stop for its last flush, and no
// longer; one that read its R10, then stopped, holds it not at all: closing
// a TLS connection must not wait for a close_notify nobody reads.
func TestTLSDeafAtTheStop(t *testing.T) {
	t.Parallel()
	serverTLS, clientTLS, _, _ := testTLS(t)
	synctest.Test(t, func(t *testing.T) {
		ts := startPipe(t, Config{TLS: serverTLS})
		ts.joinTLS(clientTLS) // never reads after its 已上线
		a := ts.joinTLS(clientTLS)
		c := ts.joinTLS(clientTLS, a) // reads up to its R10, then nothing
		start := time.Now()
		stopped := make(chan error, 1)
		go func() { stopped <- ts.stop() }()
		c.expect(r10)
		a.expect(r10)
		a.expectClosed()
		if err := <-stopped; err != nil {
			t.Fatal(err)
		}
		if got := time.Since(start); got != flushTimeout {
			t.Errorf("the stop took %v, want %v", got, flushTimeout)
		}
		if strings.Contains(ts.logs.String(), "timed out") {
			t.Errorf("the stop timed out:\n%s", ts.logs.String())
		}
	})
}

// ---- the log ----

// stuckWriter is a stderr that takes nothing until it is released.
type stuckWriter struct {
	release chan struct{}
	logs    *logBuffer
}

func (w *stuckWriter) Write(p []byte) (int, error) {
	<-w.release
	return w.logs.Write(p)
}

// Nothing the log does holds up the chat: with stderr stuck, users still
// connect, talk, leave (and leave who) and get R10 at the stop. The lines
// the log could not keep are counted, and the count logged once stderr
// takes lines again.
func TestStalledLog(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		logs := &logBuffer{}
		w := &stuckWriter{release: make(chan struct{}), logs: logs}
		ln := newPipeListener()
		ts := startServerLog(t, ln, Config{}, w, logs)
		ts.ln, ts.dial, ts.dialFrom = ln, ln.dial, ln.dialFrom
		a := ts.join()
		for range 20 {
			b := ts.join(a)
			b.send("hi")
			a.expect(b.says("hi"))
			b.conn.Close()
			a.expect(b.offline())
		}
		a.expectWho(a)
		for range logQueue { // more than the log holds
			ts.srv.event(slog.LevelInfo, "filler")
		}
		stopped := make(chan error, 1)
		go func() { stopped <- ts.stop() }()
		a.expect(r10)
		a.expectClosed()
		close(w.release)
		if err := <-stopped; err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(logs.String(), `msg="log lines dropped" count=`) {
			t.Errorf("no count of the lines dropped:\n%s", logs.String())
		}
	})
}

// ---- real loopback connections, where a pipe cannot show it ----

func TestTCPSegmentation(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{})
	a := ts.join()
	b := ts.join(a)

	for _, c := range []byte("one byte at a time\r\n") {
		a.write(string(c))
	}
	a.expect(a.says("one byte at a time"))
	b.expect(a.says("one byte at a time"))

	var many strings.Builder
	const n = 2000
	for i := range n {
		fmt.Fprintf(&many, "line %d\n", i)
	}
	a.write(many.String())
	for i := range n {
		a.expect(a.says(fmt.Sprintf("line %d", i)))
		b.expect(a.says(fmt.Sprintf("line %d", i)))
	}
	a.sync()
}

func TestTCPHalfClose(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{})
	a := ts.join()
	b := ts.join(a)
	a.write("who\nhello\nto|\nlast line, no newline")
	if err := a.conn.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	// Every reply is delivered before the server closes.
	a.expect(a.whoLine(), b.whoLine(), a.says("hello"), r4, a.says("last line, no newline"))
	a.expectEOF()
	b.expect(a.says("hello"), a.says("last line, no newline"), a.offline())
	b.expectWho(b)
}

// A client's end is logged as what it was: a close, or a reset (which is
// the client's doing, not a fault of the server's).
func TestTCPDisconnectReasons(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name, reason string
		reset        bool
	}{
		{"close", `reason="closed by client"`, false},
		{"reset", `reason="reset by client"`, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ts := startTCP(t, Config{})
			a := ts.join()
			b := ts.join(a)
			if tt.reset {
				a.conn.(*net.TCPConn).SetLinger(0) // the close sends RST
			}
			a.conn.Close()
			b.expect(a.offline())
			ts.expectLogged("disconnect", "addr="+a.addr, tt.reason)
		})
	}
}

func TestTCPLongLines(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{})
	a := ts.join()
	a.send(strings.Repeat("x", maxLineBytes+1))
	a.expect(r7)
	a.sync()

	// 10 MiB in one line: one R7, and the connection stays.
	chunk := strings.Repeat("y", 64<<10)
	for range 160 {
		a.write(chunk)
	}
	a.write("\n")
	a.expect(r7)
	a.send("still here")
	a.expect(a.says("still here"))
}

// A client that stops reading is dropped once its queue passes 1 MiB: the
// kernel holds a bounded part of the rest (the server's send buffer is
// sendBufferBytes, the client's receive buffer is set small here), so 600
// lines of 4 KB are more than enough, whatever the kernel's defaults.
func TestTCPSlowReaderDropped(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{})
	d := net.Dialer{Timeout: testTimeout, Control: func(_, _ string, c syscall.RawConn) error {
		c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 4096) })
		return nil
	}}
	conn, err := d.Dial("tcp", ts.addr)
	if err != nil {
		t.Fatal(err)
	}
	slow := ts.newClient(conn, conn.LocalAddr().String(), nil)
	slow.expect(slow.online())
	b := ts.join()
	c := ts.join(b)
	slowReaderRun(t, slow, b, c, 4000, 600)
}

func TestTCPMaxConns(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{MaxConns: 1})
	a := ts.join()
	full := ts.connect()
	full.expect(r9)
	full.expectEOF()
	a.sync()
}

// A kicked or stopped user's last line arrives, and its connection ends
// cleanly, even while its client keeps sending: the server reads on and
// drops what comes until the client closes, rather than close with input
// unread, which resets the connection and can destroy the last lines
// before the client reads them.
func TestTCPLastLineNotReset(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		name  string
		idle  time.Duration
		flood string   // what the client sends, over and over
		want  []string // what it then gets, before the end
	}{
		// A line that never ends is no activity: the user is kicked.
		{"kick", time.Second, strings.Repeat("x", 4096), []string{r7, r8}},
		// Empty lines get no reply, and each is a line the reader runs.
		{"stop", 0, strings.Repeat("\n", 4096), []string{r10}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ts := startTCP(t, Config{Idle: tt.idle})
			a := ts.join()
			flooding := make(chan error, 1)
			go func() { flooding <- flood(a.conn, tt.flood) }()
			if tt.idle == 0 {
				go ts.stop()
			}
			a.expect(tt.want...)
			a.expectEOF() // and closes
			// Until now the server read what a sent; had it closed with
			// input unread, the reset would have ended the flood first.
			if err := <-flooding; !errors.Is(err, net.ErrClosed) {
				t.Errorf("the flood ended with %v, before the client closed: the server reset the connection", err)
			}
		})
	}
}

// flood writes s until writing fails (at most 1 GB of it).
func flood(conn net.Conn, s string) error {
	b := []byte(s)
	for range (1 << 30) / len(b) {
		conn.SetWriteDeadline(time.Now().Add(testTimeout))
		if _, err := conn.Write(b); err != nil {
			return err
		}
	}
	return errors.New("the flood was never stopped")
}

// A connection turned away gets R9 and a clean end, though it sent a line
// the server never read: closing with that input unread would reset it.
func TestTCPRejectNotReset(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{MaxConns: 1})
	ts.join()
	for range 5 {
		c := ts.connect()
		c.send("hello")
		c.expect(r9)
		c.expectEOF()
	}
}

// ---- fair use, over loopback ----

// One address floods with all it is allowed (16 connections, 4 KB lines
// and whos, as fast as TCP takes them) beside a user that reads at
// 100 KB/s, for 10 s: the reader keeps every line and is not dropped, and
// a user from another address still gets in.
func TestTCPFloodBesideSlowReader(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{Rate: 5, MaxConnsPerIP: 16})
	reader := ts.join()
	var flooders []*client
	for range 16 {
		flooders = append(flooders, ts.joinFrom("127.0.0.2", reader))
	}
	over := ts.connectFrom("127.0.0.2")
	over.expect(r11)

	stop := time.Now().Add(10 * time.Second)
	for i, f := range flooders {
		go io.Copy(io.Discard, f.conn) // a flooder reads, or it would be dropped
		go func() {
			text := strings.Repeat("x", 4000)
			for k := 0; time.Now().Before(stop); k++ {
				f.conn.SetWriteDeadline(stop)
				if _, err := fmt.Fprintf(f.conn, "flood %d %d %s\nwho\n", i, k, text); err != nil {
					return
				}
			}
		}()
	}
	newcomer := ts.join() // from another address, in the middle of it
	go io.Copy(io.Discard, newcomer.conn)

	// The reader takes at most 100 KB a second and checks that each
	// flooder's lines come one after another, none missing; after the 10 s
	// its probe's reply comes after all that was queued for it.
	slow := &slowReader{r: reader.conn, rate: 100 << 10, start: time.Now()}
	reader.r = bufio.NewReader(slow)
	next := make([]int, len(flooders))
	got := 0
	reader.readUntilProbed(stop, func(line string) {
		_, rest, ok := strings.Cut(line, ":flood ")
		if !ok {
			return // a 已上线
		}
		var i, k int
		if _, err := fmt.Sscanf(rest, "%d %d", &i, &k); err != nil || k != next[i] {
			t.Fatalf("got %.40q, want flooder %d's line %d", line, i, next[i])
		}
		next[i]++
		got++
	})
	if got < 16*5 {
		t.Errorf("only %d lines: the flood did not run", got)
	}
	if ts.logged("disconnect", "name="+reader.name+" ") {
		t.Errorf("the reader was disconnected:\n%s", ts.logs.String())
	}
}

// readUntilProbed reads lines, handing each to each, until stop; then it
// sends a probe, and reads until the probe's reply (R4), which comes after
// all that was queued for c. The connection must last.
func (c *client) readUntilProbed(stop time.Time, each func(line string)) {
	c.tb.Helper()
	for n, probed := 0, false; ; n++ {
		if !probed && time.Now().After(stop) {
			c.send("to|")
			probed = true
		}
		line, err := c.readLine()
		if err != nil {
			c.tb.Fatalf("%s lost its connection after %d lines: %v", c.name, n, err)
		}
		if line == r4 {
			return
		}
		each(line)
	}
}

// slowReader reads at most rate bytes a second, as a slow link would.
type slowReader struct {
	r     io.Reader
	rate  int
	start time.Time
	n     int
}

func (s *slowReader) Read(p []byte) (int, error) {
	// Read no more than the link carried until now, waiting for it if need be.
	if ahead := time.Duration(s.n) * time.Second / time.Duration(s.rate); ahead > time.Since(s.start) {
		time.Sleep(ahead - time.Since(s.start))
	}
	n, err := s.r.Read(p[:min(len(p), 4096)])
	s.n += n
	return n, err
}

// Two addresses (32 connections) whispering to alice as fast as they may,
// while she reads at 100 KB/s, never get her dropped nor her name: each
// whisper reaches her in order, or its sender gets R12.
func TestTCPWhisperFlood(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{Rate: 5, MaxConnsPerIP: 16})
	alice := ts.join()
	alice.rename("alice")
	var attackers []*client
	for _, ip := range []string{"127.0.0.2", "127.0.0.3"} {
		for range 16 {
			attackers = append(attackers, ts.joinFrom(ip, alice))
		}
	}
	stop := time.Now().Add(5 * time.Second)
	var behind atomic.Int64
	for i, a := range attackers {
		go func() {
			for {
				line, err := a.readLine()
				if err != nil {
					return
				}
				if line == r12 {
					behind.Add(1)
				}
			}
		}()
		go func() {
			text := strings.Repeat("x", 4000)
			for k := 0; time.Now().Before(stop); k++ {
				a.conn.SetWriteDeadline(stop)
				if _, err := fmt.Fprintf(a.conn, "to|alice|%d %d %s\n", i, k, text); err != nil {
					return
				}
			}
		}()
	}
	alice.r = bufio.NewReader(&slowReader{r: alice.conn, rate: 100 << 10, start: time.Now()})
	last := make([]int, len(attackers))
	got := 0
	alice.readUntilProbed(stop, func(line string) {
		_, rest, ok := strings.Cut(line, "对您说:")
		if !ok {
			return
		}
		var i, k int
		if _, err := fmt.Sscanf(rest, "%d %d", &i, &k); err != nil || k < last[i] {
			t.Fatalf("got %.40q after attacker %d's whisper %d", line, i, last[i])
		}
		last[i] = k
		got++
	})
	someone := ts.joinFrom("127.0.0.4")
	someone.send("rename|alice")
	someone.expect(r2)
	if got == 0 {
		t.Error("no whisper reached alice: the flood did not run")
	}
	if ts.logged("disconnect", "name=alice ") {
		t.Errorf("alice was disconnected:\n%s", ts.logs.String())
	}
	t.Logf("alice kept %d whispers of 4 KB; %d got R12", got, behind.Load())
}

// A user's own who never drops it, though its reply (with long names of
// four-byte runes) is over the 1 MiB bound; nobody else is dropped.
func TestTCPWhoOverBound(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{})
	a := ts.join()
	b := ts.join(a)
	// 7,500 more names of 32 four-byte runes, as if online: they have no
	// connection, so they get no lines, but who lists them.
	const fakes = 7500
	s := ts.srv
	s.mu.Lock()
	for i := range fakes {
		name := strings.Repeat("😀", 30) + string(rune(0x1f300+i/64)) + string(rune(0x1f300+i%64))
		s.OnlineMap[nameKey(name)] = &User{Name: name, Addr: "10.0.0.9:1"}
	}
	s.whoReply = nil
	s.mu.Unlock()

	a.send("who")
	size := 0
	for range fakes + 2 {
		line, err := a.readLine()
		if err != nil {
			t.Fatalf("after %d bytes of who: %v", size, err)
		}
		size += len(line) + 1
	}
	if size <= maxQueuedBytes {
		t.Fatalf("who was %d bytes: not over the bound", size)
	}
	a.sync()
	b.sync()
	if strings.Contains(ts.logs.String(), "msg=disconnect") {
		t.Errorf("someone was dropped:\n%s", ts.logs.String())
	}
}

// ---- races ----

// Of users racing for one free name, or for names that fold alike,
// exactly one gets one.
func TestRenameRace(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		names []string // what each user asks for, the round's number added
	}{
		{"one name", slices.Repeat([]string{"prize"}, 8)},
		{"names that fold alike", []string{"Bob", "bob", "BOB", "ｂｏｂ", "bOb", "Ｂob"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ts := startTCP(t, Config{})
			var users []*client
			for range tt.names {
				users = append(users, ts.join(users...))
			}
			for round := range 20 {
				start := make(chan struct{})
				replies := make(chan string, len(users))
				var wg sync.WaitGroup
				for i, u := range users {
					wg.Go(func() {
						<-start
						u.conn.SetWriteDeadline(time.Now().Add(testTimeout))
						if _, err := fmt.Fprintf(u.conn, "rename|%s%d\n", tt.names[i], round); err != nil {
							replies <- "write: " + err.Error()
							return
						}
						line, err := u.readLine()
						if err != nil {
							line = "read: " + err.Error()
						}
						replies <- line
					})
				}
				close(start)
				wg.Wait()
				close(replies)
				won := 0
				for r := range replies {
					switch {
					case strings.HasPrefix(r, r3):
						won++
					case r != r2:
						t.Fatalf("round %d: reply %q", round, r)
					}
				}
				if won != 1 {
					t.Fatalf("round %d: %d users got a name, want 1", round, won)
				}
			}
		})
	}
}

// Users chat while others come and go: every user sees one and the same
// order of lines, a newcomer's first line is its own 已上线, and who ends
// exact.
func TestChatOrder(t *testing.T) {
	t.Parallel()
	ts := startTCP(t, Config{})
	const steady, perSender, churners, perChurner = 6, 40, 10, 3
	var users []*client
	for range steady {
		users = append(users, ts.join(users...))
	}

	// Each steady user reads the lines that follow; all must be the same.
	const want = steady*perSender + churners*(1+perChurner+1)
	seen := make([]chan []string, steady)
	for i, u := range users {
		seen[i] = make(chan []string, 1)
		go func() {
			var lines []string
			for len(lines) < want {
				line, err := u.readLine()
				if err != nil {
					break
				}
				lines = append(lines, line)
			}
			seen[i] <- lines
		}()
	}

	errs := make(chan error, steady+churners)
	var wg sync.WaitGroup
	for i, u := range users {
		wg.Go(func() {
			for j := range perSender {
				if _, err := fmt.Fprintf(u.conn, "u%d m%d\n", i, j); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	for range churners {
		wg.Go(func() {
			conn, addr, err := ts.dial()
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close()
			c := &client{tb: t, conn: conn, r: bufio.NewReader(conn), addr: addr, name: addr}
			if line, err := c.readLine(); err != nil || line != c.online() {
				errs <- fmt.Errorf("newcomer's first line %q (%v), want %q", line, err, c.online())
				return
			}
			for j := range perChurner {
				if _, err := fmt.Fprintf(conn, "churn m%d\n", j); err != nil {
					errs <- err
					return
				}
			}
			// Leave once our own lines are back, so they were handed out.
			for j, k := 0, 0; j < perChurner && k < 10*want; k++ {
				line, err := c.readLine()
				if err != nil {
					errs <- err
					return
				}
				if strings.HasPrefix(line, c.prefix()+"churn m") {
					j++
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}

	var first []string
	for i := range users {
		lines := <-seen[i]
		if len(lines) != want {
			t.Fatalf("%s saw %d lines, want %d", users[i].name, len(lines), want)
		}
		if i == 0 {
			first = lines
			continue
		}
		for k := range lines {
			if lines[k] != first[k] {
				t.Fatalf("%s and %s differ at line %d: %q vs %q", users[0].name, users[i].name, k, first[k], lines[k])
			}
		}
	}
	users[0].expectWho(users...)
}

// ---- what an operator sees ----

// The real process over TLS, with the certificate in files: a user gets
// in over loopback, and R10 at the stop.
func TestProcessTLS(t *testing.T) {
	t.Parallel()
	_, clientTLS, certPEM, keyPEM := testTLS(t)
	dir := t.TempDir()
	certFile, keyFile := dir+"/cert.pem", dir+"/key.pem"
	if err := os.WriteFile(certFile, certPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, keyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd, stderr := startProcess(t, "-port", "0", "-tls-cert", certFile, "-tls-key", keyFile)
	ts := listening(t, stderr)
	a := ts.joinTLS(clientTLS)
	a.send("who")
	a.expect(a.whoLine())
	cmd.Process.Signal(syscall.SIGTERM)
	expectCleanExit(t, cmd, a)
}

// ---- what an operator sees ----

func TestProcessVersion(t *testing.T) {
	t.Parallel()
	cmd := oneShot(t, "-version")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("-version: %v", err)
	}
	if !strings.HasPrefix(string(out), "server ") || strings.Count(string(out), "\n") != 1 || !strings.Contains(string(out), "go1.") {
		t.Errorf("-version printed %q, want one line: server, its version, Go's", out)
	}
}

// With -log-format json every line of the log is a JSON object, with the
// same events and keys as the text.
func TestProcessJSONLog(t *testing.T) {
	t.Parallel()
	cmd, stderr := startProcess(t, "-port", "0", "-idle", "0", "-log-format", "json")
	var events []map[string]any
	next := func(msg string) map[string]any {
		t.Helper()
		line := waitLine(t, stderr, `"msg":"`+msg+`"`)
		var ev map[string]any
		if err := json.Unmarshal([]byte(line), &ev); err != nil {
			t.Fatalf("not JSON: %q: %v", line, err)
		}
		events = append(events, ev)
		return ev
	}
	listening := next("listening")
	ts := &testServer{tb: t, dial: dialTCP(listening["addr"].(string))}
	a := ts.join()
	if ev := next("connect"); ev["addr"] != a.addr {
		t.Errorf("connect %v, want addr %s", ev, a.addr)
	}
	a.conn.Close()
	if ev := next("disconnect"); ev["addr"] != a.addr || ev["name"] != a.name || ev["reason"] != "closed by client" {
		t.Errorf("disconnect %v", ev)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	next("shutdown")
	for _, ev := range events {
		if ev["level"] != "INFO" || ev["time"] == nil {
			t.Errorf("event %v lacks its level or time", ev)
		}
	}
}

// The debug listener serves expvar's /debug/vars, with counters that move
// as users join, chat and leave, and pprof.
func TestProcessDebug(t *testing.T) {
	t.Parallel()
	_, stderr := startProcess(t, "-port", "0", "-idle", "0", "-debug-addr", "127.0.0.1:0")
	_, debugAddr, _ := strings.Cut(waitLine(t, stderr, "msg=\"debug listening\""), "addr=")
	ts := listening(t, stderr)
	get := func(path string) []byte {
		t.Helper()
		c := http.Client{Timeout: testTimeout}
		resp, err := c.Get("http://" + debugAddr + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %s, %v", path, resp.Status, err)
		}
		return body
	}
	type counters struct {
		Chat struct {
			Users       int64            `json:"users_online"`
			Accepted    int64            `json:"connections_accepted"`
			LinesIn     int64            `json:"lines_received"`
			BytesOut    int64            `json:"bytes_sent"`
			Disconnects map[string]int64 `json:"disconnects"`
			Rejects     map[string]int64 `json:"rejects"`
		} `json:"chat"`
	}
	vars := func() counters {
		var v counters
		if err := json.Unmarshal(get("/debug/vars"), &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	// Counters move a moment after what causes them: wait for each, a
	// bounded time.
	await := func(what string, ok func(counters) bool) {
		t.Helper()
		for range 500 {
			if ok(vars()) {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("%s: counters %+v", what, vars())
	}
	if v := vars(); v.Chat.Users != 0 || v.Chat.Accepted != 0 {
		t.Fatalf("before anyone came: %+v", v.Chat)
	}
	a := ts.join()
	b := ts.join(a)
	a.send("hello")
	a.expect(a.says("hello"))
	b.expect(a.says("hello"))
	await("two users, a line", func(v counters) bool {
		// 已上线 ×3 and hello ×2 were written
		return v.Chat.Users == 2 && v.Chat.Accepted == 2 && v.Chat.LinesIn == 1 && v.Chat.BytesOut == int64(len(a.online())+2*len(b.online())+2*len(a.says("hello"))+5)
	})
	b.conn.Close()
	a.expect(b.offline())
	await("one left", func(v counters) bool {
		return v.Chat.Users == 1 && v.Chat.Disconnects["closed by client"] == 1
	})
	if !strings.Contains(string(get("/debug/pprof/")), "goroutine") {
		t.Error("no pprof index")
	}
}

// ---- the process: flags, -port 0, signals, exit status ----

// startProcess runs the test binary as the server with args and returns
// its command and its stderr, line by line.
func startProcess(t *testing.T, args ...string) (*exec.Cmd, chan string) {
	cmd, lines, _ := startProcessPipe(t, nil, args...)
	return cmd, lines
}

// startProcessEnv is startProcess with more environment variables.
func startProcessEnv(t *testing.T, env []string, args ...string) (*exec.Cmd, chan string) {
	cmd, lines, _ := startProcessPipe(t, env, args...)
	return cmd, lines
}

// oneShot is the server's process for a run that must end on its own (a
// flag error, -h, -version): should the server start instead, it is killed
// after testTimeout, and the exit status tells.
func oneShot(t *testing.T, args ...string) *exec.Cmd {
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	cmd := exec.CommandContext(ctx, os.Args[0], args...)
	cmd.Env = append(os.Environ(), "CHAT_SERVER_MAIN=1")
	return cmd
}

// startProcessPipe is startProcessEnv that also returns stderr's read end.
func startProcessPipe(t *testing.T, env []string, args ...string) (*exec.Cmd, chan string, io.Closer) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), "CHAT_SERVER_MAIN=1"), env...)
	stdin := holdStdin(t, cmd)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	lines := make(chan string, 1000)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		stdin.Close()
	})
	return cmd, lines, stderr
}

// holdStdin gives cmd a pipe for its stdin that only this process holds:
// the server ends when it ends (see TestMain). The caller closes it once
// the server is gone.
func holdStdin(t *testing.T, cmd *exec.Cmd) io.Closer {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	return stdin
}

func waitLine(t *testing.T, lines chan string, substr string) string {
	t.Helper()
	timeout := time.After(testTimeout)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatalf("stderr ended before a line with %q", substr)
			}
			if strings.Contains(l, substr) {
				return l
			}
		case <-timeout:
			t.Fatalf("no line with %q on stderr", substr)
		}
	}
}

func TestProcessStartAndSignal(t *testing.T) {
	t.Parallel()
	for _, sig := range []os.Signal{os.Interrupt, syscall.SIGTERM, syscall.SIGHUP} {
		t.Run(sig.String(), func(t *testing.T) {
			t.Parallel()
			cmd, stderr := startProcess(t, "-port", "0", "-idle", "0")
			ts := listening(t, stderr)
			a := ts.join()
			b := ts.join(a)
			b.send("bye")
			a.expect(b.says("bye"))
			b.expect(b.says("bye"))

			start := time.Now()
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			waitLine(t, stderr, "msg=shutdown") // logged before R10 is handed out
			expectCleanExit(t, cmd, a, b)
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("exit took %v, want at most 5s", d)
			}
		})
	}
}

// When the log's reader is gone (Ctrl-C on "./server 2>&1 | tee log" ends
// tee as well), logging fails but the stop goes on: users get R10 and the
// server exits 0.
func TestProcessLogReaderGone(t *testing.T) {
	t.Parallel()
	cmd, stderr, pipe := startProcessPipe(t, nil, "-port", "0", "-idle", "0")
	ts := listening(t, stderr)
	a := ts.join()
	pipe.Close()
	if err := cmd.Process.Signal(os.Interrupt); err != nil {
		t.Fatal(err)
	}
	expectCleanExit(t, cmd, a)
}

// Closing the terminal of the server (SIGHUP) stops it as SIGTERM does;
// started with SIGHUP ignored (nohup), it keeps it ignored.
func TestProcessNohup(t *testing.T) {
	t.Parallel()
	cmd, stderr := startProcessEnv(t, []string{"CHAT_SERVER_NOHUP=1"}, "-port", "0", "-idle", "0")
	ts := listening(t, stderr)
	a := ts.join()
	if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !signalIgnored(t, cmd.Process.Pid, syscall.SIGHUP) {
		t.Fatal("SIGHUP is no longer ignored")
	}
	a.send("still here")
	a.expect(a.says("still here"))
	cmd.Process.Signal(syscall.SIGTERM)
	expectCleanExit(t, cmd, a)
}

// listening waits for the process's listening line, and returns a
// testServer that dials the address it gives (the real port, not 0).
func listening(t *testing.T, stderr chan string) *testServer {
	t.Helper()
	line := waitLine(t, stderr, "msg=listening")
	_, addr, ok := strings.Cut(line, "addr=")
	if !ok || strings.HasSuffix(addr, ":0") {
		t.Fatalf("listening line %q does not give the real address", line)
	}
	return &testServer{tb: t, dial: dialTCP(addr)}
}

// expectCleanExit checks that the stopping process tells each user R10
// and closes, and then exits 0.
func expectCleanExit(t *testing.T, cmd *exec.Cmd, users ...*client) {
	t.Helper()
	for _, c := range users {
		c.expect(r10)
		c.expectClosed()
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("exit: %v, want status 0", err)
	}
}

// signalIgnored reads from /proc whether process pid ignores sig.
func signalIgnored(t *testing.T, pid int, sig syscall.Signal) bool {
	t.Helper()
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(status), "\n") {
		if mask, ok := strings.CutPrefix(line, "SigIgn:\t"); ok {
			bits, err := strconv.ParseUint(mask, 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			return bits&(1<<(sig-1)) != 0
		}
	}
	t.Fatal("no SigIgn in /proc status")
	return false
}

// Out of file descriptors, the server still answers every connection: the
// ones it has no descriptor for get R9. At start it warned that -max-conns
// needs more than the limit. Once users leave, their slots are free at
// once: a new connection gets in.
func TestProcessOutOfDescriptors(t *testing.T) {
	t.Parallel()
	_, stderr := startProcessEnv(t, []string{"CHAT_SERVER_NOFILE=64"}, "-port", "0", "-idle", "0", "-max-conns-per-ip", "0")
	ts := listening(t, stderr)
	waitLine(t, stderr, "file descriptor limit below -max-conns")
	watcher := ts.join()
	var users []*client
	full := 0
	for range 80 {
		c := ts.connect()
		line, err := c.readLine()
		switch {
		case err == nil && line == c.online():
			users = append(users, c)
			watcher.expect(c.online())
		case err == nil && line == r9:
			full++
			c.expectClosed()
		default:
			t.Fatalf("got %q, %v; want 已上线 or R9", line, err)
		}
	}
	if full == 0 {
		t.Fatal("80 users fit in 64 descriptors")
	}
	for _, u := range users {
		u.conn.Close()
		watcher.expect(u.offline())
	}
	// The users' descriptors are closed a moment after their 已下线 goes
	// out: a newcomer may get R9 for that moment, and no longer.
	deadline := time.Now().Add(500 * time.Millisecond)
	for {
		c := ts.connect()
		line, err := c.readLine()
		if err == nil && line == c.online() {
			break
		}
		if line != r9 || time.Now().After(deadline) {
			t.Fatalf("after every user left: got %q, %v; want 已上线", line, err)
		}
		c.conn.Close()
	}
}

// With stderr on a pipe that nobody reads, the chat goes on: users
// connect, talk and leave, and the stop tells them R10 and exits 0.
func TestProcessStalledStderr(t *testing.T) {
	t.Parallel()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := exec.Command(os.Args[0], "-port", "0", "-idle", "0", "-max-conns-per-ip", "0")
	cmd.Env = append(os.Environ(), "CHAT_SERVER_MAIN=1")
	cmd.Stderr = w
	stdin := holdStdin(t, cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		stdin.Close()
	})
	first, err := bufio.NewReader(r).ReadString('\n') // then stderr is never read again
	_, addr, ok := strings.Cut(strings.TrimSpace(first), "addr=")
	if err != nil || !ok {
		t.Fatalf("first line %q, %v", first, err)
	}
	ts := &testServer{tb: t, dial: dialTCP(addr)}
	a := ts.join()
	for i := range 600 { // about 1,200 log lines: more than the pipe holds
		c := ts.join(a)
		if i%100 == 0 {
			c.send("hello")
			c.expect(c.says("hello"))
			a.expect(c.says("hello"))
		}
		c.conn.Close()
		a.expect(c.offline())
	}
	a.expectWho(a)
	cmd.Process.Signal(syscall.SIGTERM)
	expectCleanExit(t, cmd, a)
}

func TestProcessBadFlags(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args []string
		code int
		want string // in the one line on stderr
	}{
		{[]string{"-port", "70000"}, 2, "-port"},
		{[]string{"-port", "-1"}, 2, "-port"},
		{[]string{"-port", "http"}, 2, "-port"},
		{[]string{"-idle", "-5s"}, 2, "-idle"},
		{[]string{"-idle", "soon"}, 2, "-idle"},
		{[]string{"-max-conns", "-1"}, 2, "-max-conns"},
		{[]string{"-max-conns", "many"}, 2, "-max-conns"},
		{[]string{"-max-conns-per-ip", "-1"}, 2, "-max-conns-per-ip"},
		{[]string{"-rate", "-1"}, 2, "-rate"},
		{[]string{"-rate", "fast"}, 2, "-rate"},
		{[]string{"-rate", "NaN"}, 2, "-rate"},
		{[]string{"-rate", "Inf"}, 2, "-rate"},
		{[]string{"-rate", "1e-10"}, 2, "-rate"},
		{[]string{"-rate", "0.009"}, 2, "-rate"},
		{[]string{"-rate", "1000.5"}, 2, "-rate"},
		{[]string{"-rate", "1e12"}, 2, "-rate"},
		{[]string{"-verbose"}, 2, "verbose"},
		{[]string{"extra"}, 2, "extra"},
		{[]string{"-ip", "192.0.2.1", "-port", "0"}, 1, "192.0.2.1"},
		{[]string{"-ip", "1.2.3.4:80"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "[::1]:80"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "[::1"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "::1]"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "[127.0.0.1"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "[localhost"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "[localhost]"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "no such host"}, 2, "want an IP address or a host name"},
		{[]string{"-ip", "nosuchhost.invalid"}, 2, "no such host"},
		{[]string{"-log-format", "xml"}, 2, "-log-format"},
		{[]string{"-tls-cert", "cert.pem"}, 2, "-tls-cert and -tls-key go together"},
		{[]string{"-tls-cert", "/no/such/cert.pem", "-tls-key", "/no/such/key.pem"}, 2, "-tls-cert"},
		{[]string{"-debug-addr", "nonsense"}, 2, "invalid value \"nonsense\" for flag -debug-addr: want host:port"},
		{[]string{"-debug-addr", "[::1:6060"}, 2, "-debug-addr: want host:port"},
		{[]string{"-debug-addr", "127.0.0.1:99999"}, 2, "-debug-addr: want host:port"},
		{[]string{"-debug-addr", "nosuchhost.invalid:6060"}, 2, "-debug-addr: no such host"},
		{[]string{"-port", "0", "-debug-addr", "192.0.2.1:0"}, 1, "-debug-addr"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			t.Parallel()
			cmd := oneShot(t, tt.args...)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			cmd.WaitDelay = testTimeout
			err := cmd.Run()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != tt.code {
				t.Fatalf("exit %v, want status %d", err, tt.code)
			}
			out := stderr.String()
			if strings.Count(out, "\n") != 1 || !strings.Contains(out, tt.want) {
				t.Errorf("stderr %q, want one line naming %q", out, tt.want)
			}
		})
	}
}

// The flag values at the edges of what is allowed are taken (-version
// prints and exits once the flags are read).
func TestProcessGoodFlags(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"-rate", "0.01"}, {"-rate", "1000"}, {"-rate", "0"}, {"-ip", "[::1]"}, {"-ip", "[127.0.0.1]"},
		{"-ip", "localhost"}, {"-debug-addr", ":6060"}, {"-debug-addr", "[::1]:0"}, {"-idle", "0"},
	} {
		cmd := oneShot(t, append(args, "-version")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("%q: %v: %s", args, err, out)
		}
	}
}

func TestProcessHelp(t *testing.T) {
	t.Parallel()
	cmd := oneShot(t, "-h")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("-h: %v", err)
	}
	for _, flag := range []string{"-ip", "-port", "-idle", "-max-conns", "-max-conns-per-ip", "-rate", "-tls-cert", "-tls-key", "-log-format", "-debug-addr", "-version"} {
		if !strings.Contains(string(out), flag) {
			t.Errorf("-h does not explain %s:\n%s", flag, out)
		}
	}
}

// An IPv4 address is listened on with IPv4 alone: Go's "tcp" would make
// 0.0.0.0 serve IPv6 too, where README promises IPv4.
func TestListenIPv4Alone(t *testing.T) {
	t.Parallel()
	ln, err := listenTCP(netip.MustParseAddrPort("0.0.0.0:0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if ip := ln.Addr().(*net.TCPAddr).IP; ip.To4() == nil {
		t.Errorf("0.0.0.0 listens on %v", ln.Addr())
	}
}

// The debug listener holds at most maxDebugConns connections (the next
// is closed at once), closes one that sends no request in time, and one
// that stays idle after its requests: it never holds what the chat needs.
func TestDebugListenerBounded(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		srv := NewServer(slog.New(slog.DiscardHandler), Config{})
		ln := newPipeListener()
		hs := debugServer(srv)
		go hs.Serve(ln)
		defer hs.Close()
		dial := func() (net.Conn, *bufio.Reader) {
			c, _, err := ln.dial()
			if err != nil {
				t.Fatal(err)
			}
			c.SetDeadline(time.Now().Add(time.Hour))
			return c, bufio.NewReader(c)
		}
		get := func(c net.Conn, r *bufio.Reader) {
			t.Helper()
			io.WriteString(c, "GET /debug/vars HTTP/1.1\r\nHost: x\r\n\r\n")
			resp, err := http.ReadResponse(r, nil)
			if err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("GET: %v, %v", resp, err)
			}
			io.Copy(io.Discard, resp.Body)
		}
		closedAfter := func(r *bufio.Reader, want time.Duration) {
			t.Helper()
			start := time.Now()
			if _, err := r.ReadByte(); err != io.EOF {
				t.Fatalf("read %v, want EOF", err)
			}
			if got := time.Since(start); got != want {
				t.Errorf("closed after %v, want %v", got, want)
			}
		}
		keep, keepR := dial()
		get(keep, keepR)
		var silent []*bufio.Reader
		for range maxDebugConns - 1 {
			_, r := dial()
			silent = append(silent, r)
		}
		_, over := dial()
		closedAfter(over, 0)
		closedAfter(silent[0], 5*time.Second) // no request: the header timeout
		closedAfter(keepR, debugIdleTimeout-5*time.Second)
	})
}

func TestParseHost(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		in, want string // want "" for an error
	}{
		{"127.0.0.1", "127.0.0.1"},
		{"0.0.0.0", "0.0.0.0"},
		{"::1", "::1"},
		{"[::1]", "::1"},
		{"[127.0.0.1]", "127.0.0.1"},
		{"::", "::"},
		{"localhost", "localhost"},
		{"chat.example.org", "chat.example.org"},
		{"chat.example.org.", "chat.example.org."},
		{"nonsense", "nonsense"}, // a name; whether it resolves is found later
		{"1.2.3.4:80", ""},
		{"[::1]:80", ""},
		{"[::1", ""},
		{"::1]", ""},
		{"[localhost]", ""},
		{"", ""},
		{"a..b", ""},
		{"-a.b", ""},
		{"a_b", ""},
		{"a b", ""},
		{strings.Repeat("a", 64) + ".b", ""},
	} {
		got, err := parseHost(tt.in)
		switch {
		case tt.want == "" && err == nil:
			t.Errorf("-ip %q accepted as %q", tt.in, got)
		case tt.want != "" && (err != nil || got != tt.want):
			t.Errorf("-ip %q: %q, %v; want %q", tt.in, got, err, tt.want)
		}
	}
}

// ---- pure functions: tables and fuzzing ----

func TestParseCommand(t *testing.T) {
	t.Parallel()
	tests := []struct {
		line       string
		kind       cmdKind
		name, text string
	}{
		{"", cmdEmpty, "", ""},
		{"who", cmdWho, "", ""},
		{"who ", cmdText, "", "who "},
		{"hello", cmdText, "", "hello"},
		{"rename|", cmdRename, "", ""},
		{"rename|bob", cmdRename, "bob", ""},
		{"rename|a|b", cmdRename, "a|b", ""},
		{"to|", cmdTo, "", ""},
		{"to|x", cmdTo, "x", ""},
		{"to|x|", cmdTo, "x", ""},
		{"to||hi", cmdTo, "", "hi"},
		{"to|x|a|b", cmdTo, "x", "a|b"},
		{"To|x|y", cmdText, "", "To|x|y"},
	}
	for _, tt := range tests {
		got := parseCommand([]byte(tt.line))
		if got.kind != tt.kind || string(got.name) != tt.name || string(got.text) != tt.text {
			t.Errorf("parseCommand(%q) = {%d %q %q}, want {%d %q %q}", tt.line, got.kind, got.name, got.text, tt.kind, tt.name, tt.text)
		}
	}
}

// referenceClean is README's clean-up, done the obvious way.
func referenceClean(line string) string {
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) && r != '\t' || r >= 0x202a && r <= 0x202e || r >= 0x2066 && r <= 0x2069 ||
			r == 0x200e || r == 0x200f || r == 0x061c || r == 0x2028 || r == 0x2029 {
			return -1
		}
		return r
	}, strings.ToValidUTF8(line, "\uFFFD"))
}

// cjkLikeControls are the ideographs whose UTF-8 bytes resemble a control's
// (E8 82 AA… hold bytes that, taken two at a time, are bidi controls).
var cjkLikeControls = []string{"肪", "肫", "肬", "肭", "肮", "膦", "膧", "膨", "膩", "胀", "脏"}

func FuzzClean(f *testing.F) {
	for _, s := range []string{"", "plain", "\x1b[31m", "a\rb", "\xff\xfe", "\xff\x01\xff", "\u0085", "\u009f\u00a0", "\xc2", "\xed\xa0\x80", "\t", "你好\x00", "\uFFFD\xff",
		"a\u202eb", "\u2066x\u2069", "\u2029\u202f\u2065\u206a", "\xe2\x80", "\xe2\x80\xae\xff", "\u200e\u200f\u061c\u2028", "~\x7f", "a \x1fb"} {
		f.Add([]byte(s))
	}
	for _, c := range cjkLikeControls {
		f.Add([]byte(c + "\x01" + c))
		f.Add([]byte("\xff" + c + "\u202e"))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		got := clean(line)
		if want := referenceClean(string(line)); string(got) != want {
			t.Fatalf("clean(%q) = %q, want %q", line, got, want)
		}
	})
}

func FuzzParseCommand(f *testing.F) {
	for _, s := range []string{"", "who", "who ", "WHO", "rename|", "rename|x", "rename|a|b", "to|", "to|x", "to||y", "to|x|y|z", "to|x|", "|", "to"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		cmd := parseCommand([]byte(line))
		var back string
		switch cmd.kind {
		case cmdEmpty:
			back = ""
		case cmdWho:
			back = "who"
		case cmdRename:
			back = "rename|" + string(cmd.name)
			validName(cmd.name)
			nameKey(string(cmd.name))
		case cmdTo:
			back = "to|" + string(cmd.name)
			if strings.Count(line, "|") >= 2 {
				back += "|" + string(cmd.text)
			}
			if bytes.IndexByte(cmd.name, '|') >= 0 {
				t.Fatalf("to| name %q holds a pipe", cmd.name)
			}
		case cmdText:
			back = string(cmd.text)
			if line == "who" || strings.HasPrefix(line, "rename|") || strings.HasPrefix(line, "to|") {
				t.Fatalf("%q parsed as text", line)
			}
		}
		if back != line {
			t.Fatalf("parseCommand(%q) = %+v, which gives back %q", line, cmd, back)
		}
	})
}

// referenceLines is what the cutter must make of data, given at once: the
// lines, with "!" standing for an over-long line's end ("!…" while it has
// not ended).
func referenceLines(data []byte) []string {
	var out []string
	for len(data) > 0 {
		line, rest, found := bytes.Cut(data, []byte("\n"))
		data = rest
		switch content := bytes.TrimSuffix(line, []byte("\r")); {
		case len(content) > maxLineBytes && found:
			out = append(out, "!")
		case len(content) > maxLineBytes:
			out = append(out, "!…")
		case found:
			out = append(out, string(content))
		case len(line) > 0: // the last line, at the end, even if only "\r"
			out = append(out, string(content))
		}
	}
	return out
}

// cutAll cuts data given in pieces of size bytes, and says what came.
func cutAll(data []byte, size int) []string {
	var out []string
	var c cutter
	long := false
	f := func(line []byte, over bool, _ int, end bool) {
		switch {
		case over && !long:
			out, long = append(out, "!…"), true
		case !over:
			out = append(out, string(line))
		}
		if over && end {
			out[len(out)-1], long = "!", false
		}
	}
	for len(data) > 0 {
		n := min(size, len(data))
		c.cut(slices.Clone(data[:n]), f)
		data = data[n:]
	}
	if len(c.part) > 0 {
		c.cut([]byte("\n"), f) // as the reader does at the end
	}
	return out
}

func FuzzCut(f *testing.F) {
	long := strings.Repeat("x", maxLineBytes)
	for _, s := range []string{"", "a\n", "a\r\n", "a", "a\r", "\n\n", "a\nb", long + "\n", long + "\r\n", long + "y\n", long + "\r", long + "\ry\n", long + "yy", long + long + "\nz\n"} {
		f.Add([]byte(s), uint16(1))
		f.Add([]byte(s), uint16(7))
		f.Add([]byte(s), uint16(600))
	}
	f.Fuzz(func(t *testing.T, data []byte, size uint16) {
		got := cutAll(data, max(int(size), 1))
		want := referenceLines(data)
		if !slices.Equal(got, want) {
			t.Fatalf("lines of %.200q in pieces of %d:\n got %.200q\nwant %.200q", data, size, got, want)
		}
	})
}

// referenceTelnet is README's telnet rule, on the whole input at once: the
// text, the answers, and whether IAC IP came. A command the input ends in
// the middle of is still to come.
func referenceTelnet(data []byte) (text, answers []byte, interrupted bool) {
	for i := 0; i < len(data); i++ {
		if data[i] != iac {
			text = append(text, data[i])
			continue
		}
		if i++; i == len(data) {
			break
		}
		switch c := data[i]; {
		case c == iac:
			text = append(text, iac)
		case c < se:
			text = append(text, iac, c)
		case c == ip:
			return text, answers, true
		case c == sb: // up to IAC SE; IAC IAC inside is a 0xFF
			for i++; i+1 < len(data) && !(data[i] == iac && data[i+1] == se); i++ {
				if data[i] == iac {
					i++
				}
			}
			if i+1 >= len(data) {
				return text, answers, false
			}
			i++
		case c >= will:
			if i++; i == len(data) {
				break
			}
			switch c {
			case do:
				answers = append(answers, iac, wont, data[i])
			case will:
				answers = append(answers, iac, dont, data[i])
			}
		}
	}
	return text, answers, false
}

// The reader's telnet filter, fed in pieces of any size, gives what the
// rule gives on the whole input.
func FuzzTelnet(f *testing.F) {
	for _, s := range []string{"hi\n", "\xff\xfd\x01", "\xff\xfb\x18", "a\xff\xffb", "a\xffb", "\xff\xfa\x18\x00\xff\xff\xff\xf0x", "x\xff\xf4y", "\xff\xf6\xff\xf1", "\xff"} {
		f.Add([]byte(s), uint8(1))
		f.Add([]byte(s), uint8(3))
	}
	f.Fuzz(func(t *testing.T, data []byte, size uint8) {
		if len(data) > 3*messageQueue { // no hub drains the answers here
			return
		}
		s := NewServer(slog.New(slog.DiscardHandler), Config{})
		u, _ := stagedUser(s, 10001)
		u.inRoom = true // its answers go to s.Message
		var text []byte
		interrupted := false
		for rest := data; len(rest) > 0 && !interrupted; {
			n := min(max(int(size), 1), len(rest))
			buf := append([]byte{0}, rest[:n]...)
			var piece []byte
			var ip error
			piece, _, ip = u.telnet(buf[:0], buf[1:])
			interrupted = ip == io.EOF
			text = append(text, piece...)
			rest = rest[n:]
		}
		var answers []byte
		for len(s.Message) > 0 {
			answers = append(answers, (<-s.Message).line.b...)
		}
		wantText, wantAnswers, wantInterrupted := referenceTelnet(data)
		if !bytes.Equal(text, wantText) || !bytes.Equal(answers, wantAnswers) || interrupted != wantInterrupted {
			t.Fatalf("telnet(%q) in pieces of %d = %q, %q, %v; want %q, %q, %v", data, size, text, answers, interrupted, wantText, wantAnswers, wantInterrupted)
		}
	})
}

// ---- benchmarks ----

// sinkConn takes every write at once and counts the lines; reads wait
// until it is closed. It lets a benchmark time the server alone.
type sinkConn struct {
	fakeConn
	mu      sync.Mutex
	lines   int64
	want    int64
	reached chan struct{} // closed when lines reaches want
}

func newSink(port int) *sinkConn {
	return &sinkConn{fakeConn: newFake(port)}
}

func (c *sinkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lines += int64(bytes.Count(p, []byte("\n")))
	if c.reached != nil && c.lines >= c.want {
		close(c.reached)
		c.reached = nil
	}
	return len(p), nil
}

// await returns a channel closed once the sink has want lines in all.
func (c *sinkConn) await(want int64) <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	ch := make(chan struct{})
	if c.lines >= want {
		close(ch)
		return ch
	}
	c.want, c.reached = want, ch
	return ch
}

func (c *sinkConn) count() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lines
}

// benchRoom is a server with n users on sinks, their Handlers running,
// everyone's 已上线 already written.
func benchRoom(b *testing.B, n int) (*Server, []*User, []*sinkConn) {
	s := NewServer(slog.New(slog.DiscardHandler), Config{})
	go s.ListenMessager()
	users := make([]*User, n)
	sinks := make([]*sinkConn, n)
	for i := range users {
		sinks[i] = newSink(10000 + i)
		u := newUser(s, sinks[i], netip.Prefix{})
		users[i] = u
		s.wg.Go(func() { s.Handler(context.Background(), u) })
		// Each joins before the next: all see the later ones come.
		waitSinks(b, sinks[i:i+1], func(int) int64 { return 1 })
	}
	waitSinks(b, sinks, func(i int) int64 { return int64(n - i) })
	b.Cleanup(func() {
		s.send(message{kind: msgShutdown})
		s.wg.Wait()
		s.send(message{kind: msgStop})
		<-s.hubDone
	})
	return s, users, sinks
}

// deliveryWindow is how many lines a benchmark sends before it waits for
// them to arrive: the rate it measures is then one the server sustains,
// and no queue comes near maxQueuedBytes.
const deliveryWindow = 128

// waitSinks waits until each sink i has received want(i) lines in all.
func waitSinks(b *testing.B, sinks []*sinkConn, want func(i int) int64) {
	b.Helper()
	timeout := time.After(time.Minute)
	for i, c := range sinks {
		select {
		case <-c.await(want(i)):
		case <-timeout:
			b.Fatalf("sink %d has %d lines, want %d", i, c.count(), want(i))
		}
	}
}

func BenchmarkBroadcast(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("users=%d", n), func(b *testing.B) {
			s, users, sinks := benchRoom(b, n)
			text := []byte(strings.Repeat("x", 100))
			before := make([]int64, n)
			for i, c := range sinks {
				before[i] = c.count()
			}
			b.ReportAllocs()
			start := time.Now()
			lines := 0
			delivered := func(i int) int64 { return before[i] + int64(lines) }
			for b.Loop() {
				s.BroadCast(users[0], text)
				if lines++; lines%deliveryWindow == 0 {
					waitSinks(b, sinks, delivered)
				}
			}
			waitSinks(b, sinks, delivered)
			b.ReportMetric(float64(n*lines)/time.Since(start).Seconds(), "deliveries/s")
		})
	}
}

func BenchmarkWhisper(b *testing.B) {
	_, users, sinks := benchRoom(b, 2)
	from := users[0]
	to := []byte(users[1].Name)
	text := []byte(strings.Repeat("x", 100))
	before := sinks[1].count()
	b.ReportAllocs()
	start := time.Now()
	lines := 0
	delivered := func(int) int64 { return before + int64(lines) }
	for b.Loop() {
		from.whisper(to, text)
		if lines++; lines%deliveryWindow == 0 {
			waitSinks(b, sinks[1:], delivered)
		}
	}
	waitSinks(b, sinks[1:], delivered)
	b.ReportMetric(float64(lines)/time.Since(start).Seconds(), "whispers/s")
}

// who in a room of n: built once per change of the room, then shared.
func BenchmarkWho(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		for _, change := range []bool{false, true} {
			name := fmt.Sprintf("users=%d/cached", n)
			if change {
				name = fmt.Sprintf("users=%d/after_a_change", n)
			}
			b.Run(name, func(b *testing.B) {
				s := NewServer(slog.New(slog.DiscardHandler), Config{})
				for i := range n {
					u := newUser(s, newSink(10000+i), netip.Prefix{})
					s.OnlineMap[nameKey(u.Name)] = u
				}
				b.ReportAllocs()
				for b.Loop() {
					if change {
						s.mu.Lock()
						s.whoReply = nil
						s.mu.Unlock()
					}
					if l := s.who(); len(l.b) == 0 {
						b.Fatal("empty who")
					}
				}
			})
		}
	}
}

// Cutting a line out of 512-byte reads, cleaning, parsing, and paying for
// it: all that a reader does before it runs the line.
func BenchmarkReadLine(b *testing.B) {
	for _, tc := range []struct{ name, line string }{
		{"ascii", "hello, this is a plain ASCII chat line of a typical length"},
		{"chinese", "你好，这是一行普通长度的中文聊天消息，没有控制字符"},
		{"dirty", "\x1b[31mred\x1b[0m and \xff\xfe bytes\r"},
	} {
		b.Run(tc.name, func(b *testing.B) {
			data := bytes.Repeat([]byte(tc.line+"\n"), 1000)
			s := NewServer(slog.New(slog.DiscardHandler), Config{})
			var c cutter
			var budget bucket
			lines := 0
			run := func(line []byte, _ bool, size int, _ bool) {
				cmd := parseCommand(clean(line))
				if cmd.kind != cmdText {
					b.Fatal("not text")
				}
				// The budget check of flood control, at a rate it never
				// waits for.
				if budget.reserve(time.Since(s.epoch), s.cost(cmd.kind, size), time.Nanosecond, budgetUnits) > 0 {
					b.Fatal("waited")
				}
				lines++
			}
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				for rest := data; len(rest) > 0; rest = rest[min(readBytes, len(rest)):] {
					c.cut(rest[:min(readBytes, len(rest))], run)
				}
			}
			b.ReportMetric(float64(lines)/b.Elapsed().Seconds(), "lines/s")
		})
	}
}
