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
	ip := fs.String("ip", "127.0.0.1", "address to listen on")
	port := fs.Int("port", 8888, "TCP port to listen on, 0 to pick a free one")
	idle := fs.Duration("idle", 5*time.Minute, "kick a user who sends no line for this long (e.g. 10s, 5m), 0 to never kick")
	maxConns := fs.Int("max-conns", 10000, "most users online at once, 0 for no limit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: server [-ip 127.0.0.1] [-port 8888] [-idle 5m] [-max-conns 10000]\n\n"+
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
	if err == nil {
		err = checkFlags(fs.Args(), *port, *idle, *maxConns)
	}
	if err != nil {
		fmt.Fprintf(stderr, "server: %v (see server -h)\n", err)
		return 2
	}

	log := slog.New(slog.NewTextHandler(stderr, nil))
	ln, err := net.Listen("tcp", net.JoinHostPort(*ip, strconv.Itoa(*port)))
	if err != nil {
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// After the first signal, a second one kills the process at once.
	context.AfterFunc(ctx, stop)

	if err := NewServer(log, *idle, *maxConns).Serve(ctx, ln); err != nil {
		fmt.Fprintf(stderr, "server: %v\n", err)
		return 1
	}
	return 0
}

func checkFlags(rest []string, port int, idle time.Duration, maxConns int) error {
	switch {
	case len(rest) > 0:
		return fmt.Errorf("unexpected argument %q", rest[0])
	case port < 0 || port > 65535:
		return fmt.Errorf("invalid value %d for flag -port: not in 0..65535", port)
	case idle < 0:
		return fmt.Errorf("invalid value %v for flag -idle: negative", idle)
	case maxConns < 0:
		return fmt.Errorf("invalid value %d for flag -max-conns: negative", maxConns)
	}
	return nil
}
