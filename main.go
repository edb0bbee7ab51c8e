// Command server is a TCP chat server: connect with nc or telnet, and every
// line you type goes to everyone online. who lists them, rename|NAME picks a
// name, to|NAME|TEXT whispers, and users who send nothing for -idle are
// kicked. The wire protocol is that of the Go tutorial's 即时通信系统.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

// run is main without the exit, so that it can be tested: it returns 0 after
// a clean stop, 1 when the server cannot run, and 2 for bad flags.
func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	ip := fs.String("ip", "127.0.0.1", "`address` to listen on")
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
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: server [-ip 127.0.0.1] [-port 8888] [-idle 5m] [-max-conns 10000]\n"+
			"              [-max-conns-per-ip 16] [-rate 5]\n\n"+
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
	if err != nil {
		fmt.Fprintf(stderr, "server: %v (see server -h)\n", err)
		return 2
	}

	log := slog.New(slog.NewTextHandler(stderr, nil))
	ln, err := net.Listen("tcp", net.JoinHostPort(*ip, strconv.Itoa(port.v)))
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

	cfg := Config{Idle: time.Duration(idle), MaxConns: maxConns.v, MaxConnsPerIP: perIP.v, Rate: float64(rate)}
	if err := NewServer(log, cfg).Serve(ctx, ln); err != nil {
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	return 0
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
