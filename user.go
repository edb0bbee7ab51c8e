package main

import (
	"bytes"
	"cmp"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

// User is one connection. Three goroutines serve it:
//
//   - read, the reader: it reads lines, cleans and parses them, and runs
//     them (DoMessage);
//   - Server.Handler: it brings the user into the room and out of it, and
//     runs the select loop that kicks the user when no line came for -idle;
//   - ListenMessage, the writer: the only code that writes to conn. It runs
//     while the user's queue holds lines, and push starts it again.
type User struct {
	Name string // guarded by srv.mu; only u's reader changes it
	Addr string
	key  netip.Prefix // the address u counts against (-max-conns-per-ip)
	conn net.Conn
	srv  *Server

	// What waits for u: the room's log from u.at on (up to end, once u
	// left), and u's own lines, each after the log up to its place. This is
	// the course's channel C, bounded in bytes, which a channel of lines
	// cannot be. Guarded by mu; the atomics are read by the hub too.
	mu         sync.Mutex
	lc         *logChunk     // the chunk of the log that holds u.at
	at         atomic.Int64  // u's place in the log: it was sent all before
	end        atomic.Int64  // the end of u's part of the log: MaxInt64 until u left
	own        []ownLine     // replies, whispers, who: u's alone
	sent       int           // the bytes of own[0] written
	ownBytes   atomic.Int64  // the bytes of own not written yet
	writing    atomic.Bool   // a ListenMessage goroutine runs
	writeBegan atomic.Int64  // when the write in progress began (Unix ns), 0 between writes
	incoming   atomic.Int64  // the bytes of whispers to u on their way to the hub
	caughtUp   chan struct{} // closed once u is no more behind, if someone waits: see behind
	sealed     bool          // nothing more is queued (the user left)
	aborted    bool          // dropped: what waits is thrown away, conn ends at once
	flushed    chan struct{} // closed once u left and all that waited for it went
	flushOnce  sync.Once

	why    atomic.Pointer[reason] // why u left; nil while online
	err    error                  // what failed, if that is why; set before done is closed
	done   chan struct{}          // closed once u leaves
	joined chan struct{}          // closed once u is in the room
	inRoom bool                   // u is one of srv.members; ListenMessager's
	reader sync.WaitGroup

	lastLineAt atomic.Int64 // when the last complete line came, since srv.epoch
	budget     bucket       // flood control; the reader's
	telnetIn   uint8        // where the reader is in a telnet command
}

func newUser(s *Server, conn net.Conn, key netip.Prefix) *User {
	addr := conn.RemoteAddr().String()
	u := &User{Name: addr, Addr: addr, key: key, conn: conn, srv: s,
		flushed: make(chan struct{}), done: make(chan struct{}), joined: make(chan struct{})}
	u.lastLineAt.Store(int64(time.Since(s.epoch)))
	u.end.Store(math.MaxInt64)
	return u
}

// reason says why a user left: the disconnect's reason in the log.
type reason string

const (
	reasonClosed      reason = "closed by client"
	reasonReset       reason = "reset by client"
	reasonReadFailed  reason = "read failed"
	reasonIdle        reason = "idle"
	reasonSlowReader  reason = "slow reader"
	reasonStalled     reason = "stalled"
	reasonStopping    reason = "server stopping"
	reasonWriteFailed reason = "write failed"
	reasonAddrHeld    reason = "address held by a user"
	reasonHandshake   reason = "tls handshake failed"
)

// leave records why u goes, with the error if one caused it. The first
// reason wins; it reports whether this one did. Once u has left its reader
// runs no more lines, and Handler takes it out of the room.
func (u *User) leave(r reason, err error) bool {
	if !u.why.CompareAndSwap(nil, &r) {
		return false
	}
	u.err = err
	close(u.done)
	return true
}

func (u *User) gone() bool { return u.why.Load() != nil }

// readBytes is the reader's buffer: a typed line fits in one read; a line
// that does not is put together in a buffer of its own (cutter.part).
const readBytes = 2048

// read is u's reader. It cuts the input into lines and runs them
// (DoMessage), one at a time, in order, until the connection ends. Once u
// has left it runs nothing more, but reads on and drops what comes until
// the client closes or Handler's linger deadline passes.
func (u *User) read() {
	// One byte in front of what is read: a 0xFF that ended the last read
	// may have to be put back (see telnet).
	buf := make([]byte, 1+readBytes)
	var lines cutter
	long := 0 // bytes of an over-long line so far
	run := func(line []byte, over bool, size int, end bool) {
		switch {
		case u.gone():
		case over:
			long = u.tooLong(long, size, end)
		default:
			u.arrived()
			u.DoMessage(line)
		}
	}
	for {
		n, err := u.conn.Read(buf[1:])
		text, telnetBytes, interrupted := u.telnet(buf[:0], buf[1:1+n])
		err = cmp.Or(err, interrupted) // telnet's Ctrl-C ends the connection as a close does
		lines.cut(text, run)
		u.pace((telnetBytes + unitBytes - 1) / unitBytes) // telnet's bytes are paced too
		if err != nil {
			if u.telnetIn == inIAC && interrupted == nil { // a last 0xFF, no command after it
				lines.cut([]byte{iac}, run)
			}
			if len(lines.part) > 0 {
				lines.cut([]byte("\n"), run) // the last line, which came without one
			}
			r := reasonReadFailed
			if err == io.EOF {
				r = reasonClosed
			} else if errors.Is(err, syscall.ECONNRESET) {
				r = reasonReset
			}
			u.leave(r, err)
			return
		}
	}
}

// cutter cuts a stream into lines of at most maxLineBytes (README's
// "Framing"), whatever pieces it comes in.
type cutter struct {
	part []byte // the start of a line that came in earlier pieces
	long bool   // inside an over-long line: its bytes go, up to its "\n"
}

// cut hands each line of data to f: a complete line, without its "\n" and a
// "\r" before it, valid during the call only; or, with over set, the size
// of the next piece of an over-long line, and end once its "\n" came.
func (c *cutter) cut(data []byte, f func(line []byte, over bool, size int, end bool)) {
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		end := i >= 0
		if !end {
			i = len(data)
		}
		chunk := data[:i]
		data = data[min(i+1, len(data)):]
		size := len(c.part) + len(chunk)
		switch {
		// One byte past the limit is a "\r" before the "\n", or too much.
		// (Once chunk is empty, c.part held it, so it is a "\r".)
		case c.long || size > maxLineBytes+1 || size == maxLineBytes+1 && len(chunk) > 0 && chunk[len(chunk)-1] != '\r':
			c.long, c.part = !end, nil
			f(nil, true, size, end)
		case !end:
			c.part = append(c.part, chunk...)
		default:
			if c.part != nil {
				chunk, c.part = append(c.part, chunk...), nil
			}
			line := bytes.TrimSuffix(chunk, []byte("\r"))
			f(line, false, len(line), true)
		}
	}
}

// tooLong takes size more bytes of an over-long line, long of which came
// before, and returns its bytes so far (0 once it ends). Every byte is
// paced as a line's are; R7 goes out once the line is known to be too
// long, and its end counts as activity.
func (u *User) tooLong(long, size int, end bool) int {
	u.pace((long+size+unitBytes-1)/unitBytes - (long+unitBytes-1)/unitBytes)
	if long == 0 {
		u.reply(replyTooLong)
	}
	if end {
		u.arrived()
		return 0
	}
	return long + size
}

// arrived notes a complete line, which is activity for the idle kick.
func (u *User) arrived() {
	u.srv.vars.Add("lines_received", 1)
	u.lastLineAt.Store(int64(time.Since(u.srv.epoch)))
}

// DoMessage runs one line: clean it, pay for it (its bytes as received),
// then do what it says.
func (u *User) DoMessage(line []byte) {
	s := u.srv
	size, line := len(line), clean(line)
	cmd := parseCommand(line)
	if !u.pace(s.cost(cmd.kind, size)) || u.gone() {
		return // u left while the line waited
	}
	switch cmd.kind {
	case cmdEmpty:
	case cmdWho:
		s.sendTo(u, u, s.who())
	case cmdRename:
		u.rename(cmd.name)
	case cmdTo:
		u.whisper(cmd.name, cmd.text)
	default:
		s.BroadCast(u, line)
	}
}

func (u *User) reply(b []byte) { u.srv.sendTo(u, u, &line{b: b}) }

// pace is flood control: it waits until u's budget holds cost units, and
// takes them. Meanwhile the reader reads nothing more, so TCP slows the
// sender down; nothing is dropped, and the order is kept. It reports false
// if u left while it waited.
func (u *User) pace(cost int) bool {
	s := u.srv
	if s.unitEvery == 0 || cost == 0 {
		return true
	}
	wait := u.budget.reserve(time.Since(s.epoch), cost, s.unitEvery, budgetUnits)
	if wait == 0 {
		return true
	}
	s.vars.Add("lines_waited", 1)
	return u.sleep(wait, nil)
}

// sleep waits for d, or for ch to close, and reports true, unless u leaves
// first.
func (u *User) sleep(d time.Duration, ch <-chan struct{}) bool {
	select {
	case <-time.After(d):
	case <-ch:
	case <-u.done:
		return false
	}
	return true
}

func (u *User) rename(name []byte) {
	if !validName(name) {
		u.reply(replyBadName)
		return
	}
	old := u.Name
	switch u.srv.rename(u, string(name)) {
	case errNameTaken:
		u.reply(replyNameTaken)
	case nil:
		u.srv.event(slog.LevelInfo, "rename", "addr", u.Addr, "old", old, "new", u.Name)
		u.reply(append(append([]byte("您已更新用户名："), name...), '\n'))
	}
}

// whisper runs to|name|text; the checks go in the order README gives (the
// last, R12, is the hub's).
func (u *User) whisper(name, text []byte) {
	s := u.srv
	to := s.lookup(name)
	switch {
	case len(name) == 0:
		u.reply(replyBadFormat)
	case to == nil:
		u.reply(replyNoUser)
	case len(text) == 0:
		u.reply(replyNoText)
	default:
		if ch := to.behind(); ch != nil && s.unitEvery == 0 {
			u.sleep(maxLeadWait, ch) // see Server.keepUp: only the sender waits
		}
		b := make([]byte, 0, len(u.Name)+len("对您说:")+len(text)+1)
		b = append(append(append(append(b, u.Name...), "对您说:"...), text...), '\n')
		s.sendTo(u, to, &line{b: b})
	}
}

// behind returns a channel closed once u is no more than maxLead behind,
// the whispers on their way to it counted, or nil if it is not that far
// behind.
func (u *User) behind() <-chan struct{} {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.waiting()+int(u.incoming.Load()) <= maxLead, u.aborted:
		return nil
	case u.caughtUp == nil:
		u.caughtUp = make(chan struct{})
	}
	return u.caughtUp
}

// userLine formats "[addr]name:text\n". Only u's reader, or its Handler
// before the reader starts, may call it: they are the goroutines that may
// read u.Name without the lock.
func (u *User) userLine(text []byte) *line {
	b := make([]byte, 0, len(u.Addr)+len(u.Name)+len(text)+4)
	b = append(append(append(append(append(b, '['), u.Addr...), ']'), u.Name...), ':')
	return &line{b: append(append(b, text...), '\n')}
}

// The room's log, the queue and the writer.

// logChunk is a piece of the room's log: every broadcast line, in the one
// order all users get them, written once for all of them. ListenMessager
// appends; each user's writer reads on from its own place, so a chunk
// lives while some user has not read it (and a user more than its bound
// behind is dropped).
type logChunk struct {
	b     []byte                   // logChunkBytes long, written up to srv.head
	start int64                    // the place of b[0] in the log
	next  atomic.Pointer[logChunk] // set once b is full
}

const logChunkBytes = 64 << 10

// appendLog appends a line to the room's log; ListenMessager's.
func (s *Server) appendLog(b []byte) {
	head := s.head.Load()
	for rest := b; len(rest) > 0; {
		if head-s.tail.start == logChunkBytes {
			next := &logChunk{b: make([]byte, logChunkBytes), start: head}
			s.tail.next.Store(next)
			s.tail = next
		}
		k := copy(s.tail.b[head-s.tail.start:], rest)
		head, rest = head+int64(k), rest[k:]
	}
	s.head.Store(head) // now the writers may read it
}

// line is one of a user's own lines (or a who reply: many), maybe shared
// by several users (a who reply, a reply such as R4).
type line struct {
	b     []byte
	whole bool         // a who reply: see Server.push
	refs  atomic.Int32 // the queues it is in: while there is one, srv.queued counts it
}

// ownLine is a line for one user, which comes after the room's log up to at.
type ownLine struct {
	at int64
	l  *line
}

// waiting is how many bytes wait for u.
func (u *User) waiting() int {
	return int(min(u.srv.head.Load(), u.end.Load()) - u.at.Load() + u.ownBytes.Load())
}

// queueLocked adds l to u's own lines, after the log as it is now; u.mu is
// held.
func (u *User) queueLocked(l *line) {
	u.own = append(u.own, ownLine{u.srv.head.Load(), l})
	u.ownBytes.Add(int64(len(l.b)))
	if l.refs.Add(1) == 1 {
		u.srv.queued.Add(int64(len(l.b)))
	}
}

// release takes l out of one queue.
func (u *User) release(l *line) {
	if l.refs.Add(-1) == 0 {
		u.srv.queued.Add(-int64(len(l.b)))
	}
}

// wake starts u's writer, unless it runs.
func (u *User) wake() {
	if !u.writing.Load() && u.writing.CompareAndSwap(false, true) {
		go u.ListenMessage()
	}
}

// writePiece bounds one write. The kernel takes a blocked write's bytes
// when a third of the send buffer (2×sendBufferBytes) is free, so a piece
// this size goes in whole then: a write that times out means the client
// took nothing since it began (README's "Events": the stall). A connection
// that has no writev (TLS, net.Pipe) writes a line at a time, and so has a
// deadline for each.
const writePiece = 16 << 10

// ListenMessage is u's writer. It writes what waits for u, a piece at a
// time, each with a deadline stallTimeout away (or the last flush's, once
// u left), until nothing waits; then it returns, and wake starts it again.
// It is the only code that writes to u's connection.
func (u *User) ListenMessage() {
	_, writev := u.conn.(*net.TCPConn)
	var bufs net.Buffers
	for {
		u.mu.Lock()
		bufs, own := u.pieceLocked(bufs[:0], writev)
		if len(bufs) == 0 {
			u.writing.Store(false)
			u.flushedLocked()
			u.mu.Unlock()
			// A line may have come since: then a writer goes on with it.
			if u.waiting() == 0 || !u.writing.CompareAndSwap(false, true) {
				return
			}
			continue
		}
		if !u.sealed { // once sealed, seal and abort set the deadline
			u.conn.SetWriteDeadline(time.Now().Add(stallTimeout))
		}
		u.mu.Unlock()
		u.writeBegan.Store(time.Now().UnixNano())
		n, err := bufs.WriteTo(u.conn)
		u.writeBegan.Store(0)
		u.wrote(int(n), own, err)
	}
}

// pieceLocked returns the next piece to write: the room's log from u.at
// up to the place of u's next own line, or, once that place is reached,
// own lines. It reports whether they are own lines; u.mu is held.
func (u *User) pieceLocked(bufs net.Buffers, writev bool) (net.Buffers, bool) {
	at, size := u.at.Load(), 0
	if len(u.own) > 0 && u.own[0].at <= at {
		for i, o := range u.own {
			b := o.l.b[:min(len(o.l.b), writePiece-size)]
			if i == 0 {
				b = o.l.b[u.sent:min(len(o.l.b), u.sent+writePiece)]
			}
			if o.at > at || size == writePiece || i > 0 && !writev {
				break
			}
			bufs, size = append(bufs, b), size+len(b)
		}
		return bufs, true
	}
	end := min(u.srv.head.Load(), u.end.Load())
	if len(u.own) > 0 {
		end = min(end, u.own[0].at)
	}
	for c := u.lc; at < end && size < writePiece; {
		off := int(at - c.start)
		if off == len(c.b) {
			c = c.next.Load()
			continue
		}
		b := c.b[off : off+int(min(int64(len(c.b)-off), end-at, int64(writePiece-size)))]
		if i := bytes.IndexByte(b, '\n'); !writev && i >= 0 {
			b = b[:i+1]
		}
		bufs, at, size = append(bufs, b), at+int64(len(b)), size+len(b)
		if !writev {
			break
		}
	}
	return bufs, false
}

// wrote takes the n bytes written off what waits for u, and ends u if the
// write failed.
func (u *User) wrote(n int, own bool, err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case u.aborted:
	case own:
		k := 0
		for u.sent += n; k < len(u.own) && u.sent >= len(u.own[k].l.b); k++ {
			u.sent -= len(u.own[k].l.b)
			u.release(u.own[k].l)
		}
		clear(u.own[:k])
		if u.own = u.own[k:]; len(u.own) == 0 {
			u.own = nil // a burst's array does not stay with an idle user
		}
		u.ownBytes.Add(-int64(n))
	default:
		at := u.at.Add(int64(n))
		for next := u.lc.next.Load(); next != nil && at >= next.start; next = u.lc.next.Load() {
			u.lc = next
		}
	}
	u.srv.vars.Add("bytes_sent", int64(n))
	if u.caughtUp != nil && u.waiting()+int(u.incoming.Load()) <= maxLead {
		close(u.caughtUp) // senders wait for it: see behind
		u.caughtUp = nil
	}
	if err != nil {
		r := reasonWriteFailed
		if errors.Is(err, os.ErrDeadlineExceeded) {
			r = reasonStalled
		}
		u.leave(r, err)
		u.abortLocked()
	}
}

// seal ends what waits for u: the log up to now, and its own lines, then
// final (if not nil); nothing more is queued. From now on the writes have
// flushTimeout, so that a client that stopped reading holds nothing up for
// longer.
func (u *User) seal(final []byte) {
	u.mu.Lock()
	if !u.sealed {
		u.end.Store(u.srv.head.Load())
		if final != nil {
			u.queueLocked(&line{b: final})
		}
		u.sealed = true
		u.conn.SetWriteDeadline(time.Now().Add(flushTimeout))
		u.flushedLocked()
	}
	u.mu.Unlock()
	u.wake()
}

// abortLocked drops what waits for u, whose bytes leave srv.queued at once,
// and ends its connection's reads and writes at once; u.mu is held.
func (u *User) abortLocked() {
	if u.aborted {
		return
	}
	u.aborted, u.sealed = true, true
	for _, o := range u.own {
		u.release(o.l)
	}
	u.own, u.sent = nil, 0
	u.ownBytes.Store(0)
	u.end.Store(u.at.Load())
	if u.caughtUp != nil {
		close(u.caughtUp)
		u.caughtUp = nil
	}
	u.conn.SetDeadline(aLongTimeAgo)
	u.flushedLocked()
}

// flushedLocked closes u.flushed once u left and all that waited for it is
// written (or dropped); u.mu is held.
func (u *User) flushedLocked() {
	if u.sealed && len(u.own) == 0 && u.at.Load() >= u.end.Load() && !u.writing.Load() {
		u.flushOnce.Do(func() { close(u.flushed) })
	}
}

// aLongTimeAgo is a deadline that has passed: it ends a blocked read or
// write at once.
var aLongTimeAgo = time.Unix(1, 0)

// linger ends u's connection once its last line is written: it tells the
// client that nothing more comes, and leaves the reader lingerTimeout to
// read what the client still sends, so that the close does not reset the
// connection while the last lines may still be on their way. A dropped
// user's connection has ended already.
func (u *User) linger() {
	u.mu.Lock()
	aborted := u.aborted
	u.mu.Unlock()
	if !aborted {
		closeWrite(u.conn)
		u.conn.SetReadDeadline(time.Now().Add(lingerTimeout))
	}
}

// closeWrite tells the client that nothing more comes (TCP's FIN) while
// its input can still be read. A connection that cannot half-close
// (net.Pipe) is closed.
func closeWrite(conn net.Conn) {
	if cw, ok := netConn(conn).(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	netConn(conn).Close()
}

// netConn is the connection under TLS, if any. A TLS connection is
// half-closed and closed there: TLS's close_notify waits up to 5 s for a
// client that does not read, longer than any last flush may take.
func netConn(conn net.Conn) net.Conn {
	if tc, ok := conn.(*tls.Conn); ok {
		return tc.NetConn()
	}
	return conn
}

// Telnet.

// The telnet bytes the reader knows (RFC 854).
const (
	iac  = 0xff // interpret as command: what follows is telnet's
	dont = 0xfe
	do   = 0xfd
	wont = 0xfc
	will = 0xfb
	sb   = 0xfa // subnegotiation, up to IAC SE
	ip   = 0xf4 // interrupt process: telnet's Ctrl-C
	se   = 0xf0 // the lowest command byte
	// Where the reader is in a command (User.telnetIn): 0 in text, inIAC
	// after an IAC, the verb (will, wont, do, dont) before its option, sb
	// in a subnegotiation, inSBIAC after an IAC in one.
	inIAC   = 1
	inSBIAC = 2
)

// telnet takes telnet's commands out of data (README's "Framing"), writing
// the text that remains to dst, which is data's buffer moved at most one
// byte earlier, and answers telnet's questions: DO with WONT, WILL with
// DONT. It returns the text, how many bytes it took out, and io.EOF if the
// client sent IAC IP, after which the rest is not read.
func (u *User) telnet(dst, data []byte) (text []byte, took int, interrupted error) {
	if u.telnetIn == 0 && bytes.IndexByte(data, iac) < 0 {
		return data, 0, nil // no telnet in it: most reads
	}
	for i, c := range data {
		switch in := u.telnetIn; {
		case in == 0 && c == iac:
			u.telnetIn = inIAC
		case in == 0:
			dst = append(dst, c)
		case in == inIAC && c == iac: // IAC IAC is a 0xFF in the text
			dst, u.telnetIn = append(dst, iac), 0
		case in == inIAC && c == ip:
			return dst, i + 1 - len(dst), io.EOF
		case in == inIAC && (c == sb || c >= will):
			u.telnetIn = c
		case in == inIAC && c < se: // a 0xFF that is not telnet's: invalid UTF-8, cleaned
			dst, u.telnetIn = append(dst, iac, c), 0
		case in == do || in == will:
			u.reply([]byte{iac, map[byte]byte{do: wont, will: dont}[in], c})
			u.telnetIn = 0
		case in == sb && c == iac:
			u.telnetIn = inSBIAC
		case in == inSBIAC && c == se, in != sb && in != inSBIAC:
			u.telnetIn = 0
		case in == inSBIAC:
			u.telnetIn = sb
		}
	}
	return dst, len(data) - len(dst), nil
}

// Cleaning lines.

// clean returns line with each run of invalid UTF-8 replaced by one U+FFFD
// (as strings.ToValidUTF8 does) and the characters README's "Framing"
// names removed, so that no user can drive another's terminal or turn
// another's text around. A line that needs none of it is returned as it is.
func clean(line []byte) []byte {
	// Printable ASCII needs nothing. Skipping it first carries a figure:
	// compare.sh's private scenario (whispers, fair-use limits off) gave
	// 0.81× the limit server without it and 0.87× with it (medians of 4
	// interleaved `chatload -scenario private` runs each); the goal is 0.85×.
	i := 0
	for i < len(line) && line[i] >= 0x20 && line[i] < 0x7f {
		i++
	}
	var out []byte // nil until something changes
	invalid := false
	for i < len(line) {
		r, size := utf8.DecodeRune(line[i:])
		bad := r == utf8.RuneError && size == 1
		drop := !bad && removed(r)
		if out == nil && (bad || drop) {
			out = append(make([]byte, 0, len(line)), line[:i]...)
		}
		switch {
		case out == nil, drop:
		case bad && !invalid:
			out = utf8.AppendRune(out, utf8.RuneError)
		case !bad:
			out = append(out, line[i:i+size]...)
		}
		invalid = bad
		i += size
	}
	if out == nil {
		return line
	}
	return out
}

// removed reports whether clean removes r: a control character but TAB
// (C0, DEL, C1), a bidi embedding, override or isolate, a direction mark,
// or the line or paragraph separator.
func removed(r rune) bool {
	switch {
	case r < 0x20:
		return r != '\t'
	case r < 0x7f:
		return false
	case r <= 0x9f, r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069:
		return true
	}
	return r == 0x200e || r == 0x200f || r == 0x061c || r == 0x2028 || r == 0x2029
}

// Commands.

type cmdKind uint8

const (
	cmdText cmdKind = iota
	cmdEmpty
	cmdWho
	cmdRename
	cmdTo
)

// command is a parsed line; name and text point into the line.
type command struct {
	kind cmdKind
	name []byte // rename|NAME, to|NAME|…
	text []byte // to|…|TEXT
}

// parseCommand tells what a cleaned line asks for. It only splits the line;
// the checks of each command are done where it runs.
func parseCommand(line []byte) command {
	switch {
	case len(line) == 0:
		return command{kind: cmdEmpty}
	case string(line) == "who":
		return command{kind: cmdWho}
	case bytes.HasPrefix(line, []byte("rename|")):
		return command{kind: cmdRename, name: line[len("rename|"):]}
	case bytes.HasPrefix(line, []byte("to|")):
		name, text, _ := bytes.Cut(line[len("to|"):], []byte("|"))
		return command{kind: cmdTo, name: name, text: text}
	}
	return command{kind: cmdText, text: line}
}

// Names.

// validName reports whether name may be chosen with rename| (README's
// "Users and names"): so that no name looks like an address, forges the
// [addr]name: prefix, or passes for another name in who or in a whisper.
func validName(name []byte) bool {
	var scripts []string // the scripts of its letters, Common and Inherited aside
	prev := ""           // the script of the rune before, if a letter's
	for i, r := range string(name) {
		sc := scriptOf(r)
		switch {
		case unicode.IsSpace(r),
			unicode.Is(unicode.C, r), // Cc, Cf, Co
			!unicode.In(r, unicode.L, unicode.M, unicode.N, unicode.P, unicode.S, unicode.Z), // Cn
			unicode.In(r, unicode.Variation_Selector, unicode.Other_Default_Ignorable_Code_Point),
			strings.ContainsRune(notInNames, r),
			unicode.Is(unicode.M, r) && (i == 0 || prev == "Latin" || prev == "Greek" || prev == "Cyrillic"),
			sc == "" && unicode.In(r, unicode.Lu, unicode.Ll, unicode.Lt, unicode.Lo):
			return false
		}
		prev = ""
		if unicode.IsLetter(r) {
			prev = sc
		}
		if sc != "" && !slices.Contains(scripts, sc) {
			scripts = append(scripts, sc)
		}
	}
	n := utf8.RuneCount(name)
	return utf8.Valid(name) && n >= 1 && n <= maxNameRunes && oneScript(scripts)
}

// scriptOf returns the script of r, or "" for the Common and Inherited
// scripts (digits, punctuation, emoji, combining accents…).
func scriptOf(r rune) string {
	for name, table := range unicode.Scripts {
		if unicode.Is(table, r) && name != "Common" && name != "Inherited" {
			return name
		}
	}
	return ""
}

// oneScript reports whether a name's scripts are one, or fit one of the
// mixes in which a language is written: Japanese, Korean, and Chinese
// with zhuyin.
func oneScript(scripts []string) bool {
	return len(scripts) <= 1 || slices.ContainsFunc([]string{"Latin Han Hiragana Katakana", "Latin Han Hangul", "Latin Han Bopomofo"},
		func(mix string) bool {
			return !slices.ContainsFunc(scripts, func(sc string) bool { return !slices.Contains(strings.Fields(mix), sc) })
		})
}

// nameKey is the key that makes names unique, and by which to| finds a
// user: full-width ASCII becomes ASCII, each rune the least of its case
// folding (unicode.SimpleFold), and a letter that looks like a Latin letter
// or digit that letter (lookAlike).
func nameKey(name string) string {
	key := make([]byte, 0, len(name))
	for _, r := range name {
		if r < 0x80 { // ASCII: fold is ToUpper, and nothing looks alike
			key = append(key, byte(unicode.ToUpper(r)))
			continue
		}
		if r >= 0xff01 && r <= 0xff5e {
			r -= 0xff01 - 0x21
		}
		r = fold(r)
		key = utf8.AppendRune(key, cmp.Or(lookAlike[r], r))
	}
	return string(key)
}

func fold(r rune) rune {
	least := r
	for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
		least = min(least, f)
	}
	return least
}

// lookAlike maps each letter of lookAlikeLetters, folded, to the ASCII
// letter or digit it looks like, folded.
var lookAlike = func() map[rune]rune {
	m := make(map[rune]rune)
	pairs := []rune(lookAlikeLetters)
	for i := 0; i+1 < len(pairs); i += 2 {
		m[fold(pairs[i])] = fold(pairs[i+1])
	}
	return m
}()

// lookAlikeLetters are pairs: a Latin, Greek or Cyrillic letter, and the
// one ASCII letter or digit that Unicode's confusables data (UTS #39,
// version 17) maps it to. Where case partners disagree (Cyrillic І is "l",
// і is "i") the lowercase one's wins. ʟ is added by hand: UTS #39 maps
// nothing from it.
const lookAlikeLetters = "" +
	"µmþpıiſsƅbƍgƒfƨ2ƽsƿpǀlȝ3ȣ8ɑaɜ3ɡgɣyɩiɪiɯwʀrʋuʏyʒ3ʝjʟlͺiαaβbγyεeζzηhιiκkμmνv" +
	"οoρpςoσoτtυuχxϐbϒyϝfϰkϱpϲcϳjϵeϸpϻmаaб6вbгrеeз3кkмmнhоoрpсcтtуyхxшwьbѕsіi" +
	"јjѡwѵvүyһhҽeӏlӡ3ԁdԍgԛqԝwᲀbᲂoᲃcᲄtᲅtᴄcᴏoᴑoᴜuᴠvᴡwᴢzᴦrᶃgᶌyẝfỿyιiⅰiⅴvⅹxⅼlⅽcⅾd" +
	"ⅿmꙅ2ꙇiꜱsꝛ2ꝫ3ꝯ9ꞙfꞟuꞵbꬲeꬵfꬽoꭇrꭈrꭎuꭒuꭓxꭚy"

// notInNames are the characters no name may hold: | : [ ] and what looks
// like them (UTS #39, and a few it misses: ｜ ፡ ⟦…), the blank fillers,
// and U+FFFC.
const notInNames = "|:[]" +
	"ǀǁː˸։\u05c0\u05c3\u0703\u0704\u0903\u0a83᛬᠃᠉⁚∣∶⏽❲❳⧴⩴〔〕ꓽ꞉︰：［］￨𐌠𞣇" +
	"፡‖∥│┃⟦⟧〚〛︓︱﹕｜" +
	"\u115f\u1160\u3164\uffa0\u2800\ufffc"
