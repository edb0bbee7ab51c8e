package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

// User is one connection. Two goroutines serve it: serve reads and runs
// its lines; ListenMessage is the select loop that writes its output (the
// only goroutine that writes to conn) and watches its idle timer and the
// server's stop.
type User struct {
	Name string // guarded by srv.mu; only this user's reader changes it
	Addr string
	conn net.Conn
	srv  *Server

	out      outbox
	in       lineReader
	lastLine atomic.Int64 // when the last complete line arrived, since srv.epoch
	reason   atomic.Pointer[string]
	idx      int // position in srv.members; owned by ListenMessager

	// Owned by ListenMessage.
	sending       [][]byte    // the chunks being written
	iov           [][]byte    // backing array of unsent
	unsent        net.Buffers // what of them the kernel has not taken yet
	final         bool        // the queue is sealed: the deadline is the last one
	writeDeadline time.Time   // when the current write slice ends
}

// writeSlice bounds one conn.Write while the user is open. A client that
// takes nothing for that long sends the writer back to its select loop,
// with the rest kept for later, so that a writer blocked on a client that
// stopped reading still kicks it on time and sees the server stop.
const writeSlice = 500 * time.Millisecond

func newUser(s *Server, conn net.Conn) *User {
	addr := conn.RemoteAddr().String()
	u := &User{Name: addr, Addr: addr, conn: conn, srv: s}
	u.out.wake = make(chan struct{}, 1)
	u.in.rd = conn
	u.lastLine.Store(s.now())
	return u
}

// leaving records why u goes. The first reason wins; it reports whether
// this one did. Once a reason is set, u runs no more lines.
func (u *User) leaving(reason string) bool {
	return u.reason.CompareAndSwap(nil, &reason)
}

// serve is u's reader: it announces u, runs its lines until the connection
// ends or u is told to go, and takes it out of the room.
func (u *User) serve(ctx context.Context) {
	s := u.srv
	s.Online(u)
	err := u.readLines()
	switch {
	case err == io.EOF:
		u.leaving("closed by client")
	case err != nil:
		u.leaving("read failed: " + err.Error())
	}
	s.Offline(ctx, u, *u.reason.Load())
	if err == nil {
		// Told to go: read on, dropping what comes, until the writer has
		// closed the connection. Closing with input unread would reset it,
		// and a reset can destroy R8 or R10 before the client reads it.
		u.conn.SetReadDeadline(time.Time{})
		discard(u.conn, u.in.small[:])
	}
	u.in.release()
}

// readLines runs u's lines until reading fails or u is told to go. Once u
// is told to go (kicked, dropped, the server stops) nothing more is run,
// not even the partial line that closing the connection turns up.
func (u *User) readLines() error {
	for {
		line, err := u.in.next()
		if u.reason.Load() != nil {
			return nil
		}
		switch {
		case err == errLineTooLong:
			u.srv.sendTo(u, replyTooLong, nil)
		case err != nil:
			return err
		default:
			u.lastLine.Store(u.srv.now())
			u.DoMessage(line)
		}
	}
}

func (s *Server) now() int64 { return int64(time.Since(s.epoch)) }

// DoMessage runs one line: clean it, then do what it says.
func (u *User) DoMessage(line []byte) {
	s := u.srv
	if needsCleaning(line) {
		scratch := lineBufs.get()
		defer lineBufs.put(scratch)
		scratch.b = appendClean(scratch.b, line)
		line = scratch.b
	}
	cmd := parseCommand(line)
	switch cmd.kind {
	case cmdEmpty:
	case cmdWho:
		s.sendTo(u, s.who(), nil)
	case cmdRename:
		u.rename(cmd.name)
	case cmdTo:
		u.whisper(cmd.name, cmd.text)
	default:
		s.BroadCast(u, line)
	}
}

func (u *User) rename(name []byte) {
	s := u.srv
	if !validName(name) {
		s.sendTo(u, replyBadName, nil)
		return
	}
	old := u.Name
	if err := s.rename(u, string(name)); err != nil {
		s.sendTo(u, replyNameTaken, nil)
		return
	}
	s.log.Info("rename", "addr", u.Addr, "old", old, "new", u.Name)
	buf := lineBufs.get()
	buf.b = append(buf.b, "您已更新用户名："...)
	buf.b = append(buf.b, name...)
	buf.b = append(buf.b, '\n')
	s.sendTo(u, buf.b, buf)
}

// whisper runs to|name|text; the checks go in the order PROTOCOL.md gives.
func (u *User) whisper(name, text []byte) {
	s := u.srv
	if len(name) == 0 {
		s.sendTo(u, replyBadFormat, nil)
		return
	}
	to := s.lookup(name)
	switch {
	case to == nil:
		s.sendTo(u, replyNoUser, nil)
	case len(text) == 0:
		s.sendTo(u, replyNoText, nil)
	default:
		buf := lineBufs.get()
		buf.b = append(buf.b, u.Name...)
		buf.b = append(buf.b, "对您说:"...)
		buf.b = append(buf.b, text...)
		buf.b = append(buf.b, '\n')
		s.sendTo(to, buf.b, buf)
	}
}

// appendUserPrefix appends "[addr]name:". Only u's own reader may call it:
// it is the one goroutine that sees u.Name without the lock.
func appendUserPrefix(dst []byte, u *User) []byte {
	dst = append(dst, '[')
	dst = append(dst, u.Addr...)
	dst = append(dst, ']')
	dst = append(dst, u.Name...)
	return append(dst, ':')
}

func appendUserLine(dst []byte, u *User, text string) []byte {
	dst = append(appendUserPrefix(dst, u), text...)
	return append(dst, '\n')
}

// push queues line for u without ever blocking. A user whose queue would
// pass maxQueuedBytes has stopped reading and is dropped.
func (u *User) push(line []byte) {
	if u.out.push(line) {
		return
	}
	if u.leaving("output queue over limit (client stopped reading)") {
		u.srv.log.Warn("drop", "addr", u.Addr, "reason", "slow reader", "limit_bytes", maxQueuedBytes)
	}
	// Closing is not writing: it ends a write in progress at once, and the
	// reader then fails and takes u out of the room.
	u.conn.Close()
}

// ListenMessage is u's select loop: it writes u's queued lines, all that
// waits in one write, kicks u when its idle timer finds no line for
// srv.idle, and seals u's queue with R10 when the server stops. It returns
// once the queue is sealed and written, or a write failed.
func (u *User) ListenMessage(ctx context.Context) {
	defer u.conn.Close()
	var timer *time.Timer
	var idle <-chan time.Time
	if u.srv.idle > 0 {
		timer = time.NewTimer(u.srv.idle)
		defer timer.Stop()
		idle = timer.C
	}
	for {
		select {
		case <-u.out.wake:
		case <-idle:
			u.checkIdle(timer)
		case <-ctx.Done():
			u.stop()
		}
		st := u.flush()
		for st == stalled {
			select {
			case <-idle:
				u.checkIdle(timer)
			case <-ctx.Done():
				u.stop()
			default:
			}
			st = u.flush()
		}
		if st == closed {
			return
		}
	}
}

// checkIdle kicks u if no line came for srv.idle, and otherwise sets the
// timer for the time left: the reader only stamps lastLine, so a line costs
// no timer operation.
func (u *User) checkIdle(timer *time.Timer) {
	s := u.srv
	if left := s.idle - time.Duration(s.now()-u.lastLine.Load()); left > 0 {
		timer.Reset(left)
		return
	}
	if u.leaving("idle") {
		s.log.Info("kick", "addr", u.Addr, "idle", s.idle)
		u.tell(replyKicked)
	}
}

func (u *User) stop() {
	u.leaving("server stopping")
	u.tell(replyStopping)
}

// tell seals u's queue with final as its last line and wakes the reader, so
// that u leaves the room now rather than once the last flush is done.
func (u *User) tell(final []byte) {
	u.out.seal(final)
	u.conn.SetReadDeadline(aLongTimeAgo)
}

// aLongTimeAgo is a deadline that has passed: it ends a blocked read at once.
var aLongTimeAgo = time.Unix(1, 0)

// discard reads and drops what conn sends until reading fails: at EOF, at
// a deadline, or when conn is closed.
func discard(conn net.Conn, buf []byte) {
	for {
		if _, err := conn.Read(buf); err != nil {
			return
		}
	}
}

type flushState uint8

const (
	flushed flushState = iota // all written; the user is open
	stalled                   // the client took nothing for a write slice
	closed                    // sealed and written, or a write failed
)

// flush writes until the queue is empty or the client stalls.
func (u *User) flush() flushState {
	for {
		if !u.final && u.out.sealed.Load() {
			// The last flush gets flushTimeout in all.
			u.final = true
			u.conn.SetWriteDeadline(time.Now().Add(flushTimeout))
		}
		if len(u.unsent) == 0 {
			freeChunks(u.sending)
			u.sending = u.out.take(u.sending)
			if len(u.sending) == 0 {
				u.sending, u.iov = shrink(u.sending), shrink(u.iov)
				if u.final {
					return closed
				}
				return flushed
			}
			u.iov = append(u.iov[:0], u.sending...)
			u.unsent = u.iov
		}
		if !u.final {
			if now := time.Now(); u.writeDeadline.Sub(now) < writeSlice/2 {
				u.writeDeadline = now.Add(writeSlice)
				u.conn.SetWriteDeadline(u.writeDeadline)
			}
		}
		err := u.write()
		switch {
		case err == nil:
		case !u.final && errors.Is(err, os.ErrDeadlineExceeded):
			return stalled
		default:
			u.leaving("write failed: " + err.Error())
			u.out.seal(nil)
			freeChunks(u.sending)
			freeChunks(u.out.take(nil))
			u.sending, u.iov, u.unsent = nil, nil, nil
			return closed
		}
	}
}

// write hands u.unsent to the kernel: one chunk with write, several with
// one writev. What the kernel did not take stays in u.unsent, and only
// that still counts against maxQueuedBytes.
func (u *User) write() error {
	var n int64
	var err error
	if len(u.unsent) == 1 {
		var k int
		k, err = u.conn.Write(u.unsent[0])
		if u.unsent[0] = u.unsent[0][k:]; len(u.unsent[0]) == 0 {
			u.unsent = u.unsent[:0]
		}
		n = int64(k)
	} else {
		n, err = u.unsent.WriteTo(u.conn)
	}
	u.out.inflight.Add(-n)
	return err
}

// outbox is a user's queue of unsent bytes. Its bound is in bytes, which a
// channel of lines cannot express (and a channel deep enough for 1 MiB of
// short lines would cost every user that depth up front), so the bytes
// wait in chunks and a channel of capacity one says there is something to
// write.
type outbox struct {
	mu       sync.Mutex
	pending  [][]byte     // chunks in order; the last may have room
	queued   int          // bytes in pending
	inflight atomic.Int64 // bytes taken by the writer and not yet written
	sealed   atomic.Bool
	wake     chan struct{}
}

// push appends line unless the queue is sealed. It reports false, and
// seals the queue, when line would take it past maxQueuedBytes.
func (o *outbox) push(line []byte) bool {
	o.mu.Lock()
	if o.sealed.Load() {
		o.mu.Unlock()
		return true
	}
	if o.queued+int(o.inflight.Load())+len(line) > maxQueuedBytes {
		o.sealed.Store(true)
		freeChunks(o.pending)
		o.pending, o.queued = nil, 0
		o.mu.Unlock()
		return false
	}
	first := len(o.pending) == 0
	o.appendLocked(line)
	o.mu.Unlock()
	if first {
		o.signal()
	}
	return true
}

func (o *outbox) appendLocked(line []byte) {
	o.queued += len(line)
	for len(line) > 0 {
		n := len(o.pending)
		if n == 0 || len(o.pending[n-1]) == cap(o.pending[n-1]) {
			o.pending = append(o.pending, newChunk(n == 0))
			n++
		}
		last := o.pending[n-1]
		k := copy(last[len(last):cap(last)], line)
		o.pending[n-1] = last[:len(last)+k]
		line = line[k:]
	}
}

func (o *outbox) signal() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// seal ends the queue, after final if it is not nil.
func (o *outbox) seal(final []byte) {
	o.mu.Lock()
	if !o.sealed.Load() {
		o.sealed.Store(true)
		o.appendLocked(final)
	}
	o.mu.Unlock()
	o.signal()
}

// take hands the writer every chunk that waits, in spare's place.
func (o *outbox) take(spare [][]byte) [][]byte {
	o.mu.Lock()
	defer o.mu.Unlock()
	chunks := o.pending
	o.pending = spare[:0]
	o.inflight.Store(int64(o.queued))
	o.queued = 0
	return chunks
}

// Chunks come in two fixed sizes, each from its own pool, so a chunk that
// served one user's burst never sits half empty in another's queue: a
// user's first chunk is small (a line, or the few of a connect storm), the
// ones after it are big (a burst, handed to the kernel in one writev).
const (
	smallChunk = 512
	bigChunk   = 16 << 10
)

var (
	smallChunks = sync.Pool{New: func() any { return new([smallChunk]byte) }}
	bigChunks   = sync.Pool{New: func() any { return new([bigChunk]byte) }}
)

func newChunk(first bool) []byte {
	if first {
		return smallChunks.Get().(*[smallChunk]byte)[:0]
	}
	return bigChunks.Get().(*[bigChunk]byte)[:0]
}

func freeChunks(chunks [][]byte) {
	for i, c := range chunks {
		switch cap(c) {
		case smallChunk:
			smallChunks.Put((*[smallChunk]byte)(c[:smallChunk]))
		case bigChunk:
			bigChunks.Put((*[bigChunk]byte)(c[:bigChunk]))
		}
		chunks[i] = nil
	}
}

// shrink keeps a short list for reuse and lets a long one (left by a
// burst) go, so that an idle user holds nothing a burst grew.
func shrink(list [][]byte) [][]byte {
	if cap(list) > 8 {
		return nil
	}
	return list[:0]
}

// Reading lines.

const (
	// smallReadBytes is the buffer an idle connection waits with: enough
	// for a typed line, so that a chat line costs one read.
	smallReadBytes = 512
	// bigReadBytes is the buffer used while data keeps coming. It holds an
	// over-long line's first maxLineBytes+1 bytes with room to read more.
	bigReadBytes = 2 * maxLineBytes
)

var errLineTooLong = errors.New("line too long")

var bigReads = sync.Pool{New: func() any { return new([bigReadBytes]byte) }}

// lineReader cuts a byte stream into lines of at most maxLineBytes. It
// waits for input in a small buffer of its own and borrows a big one only
// while a burst or a long line needs it, so an idle connection holds no
// read buffer it is not using.
type lineReader struct {
	rd    io.Reader
	buf   []byte // small[:] or big[:]
	r, w  int    // buf[r:w] is read and not yet returned
	big   *[bigReadBytes]byte
	busy  bool  // the last read brought at least len(small) bytes: more may follow
	skip  bool  // inside an over-long line: drop bytes up to its "\n"
	err   error // the read error, returned once the buffered lines are
	small [smallReadBytes]byte
}

// next returns the next line, without its "\n" and one "\r" before it; the
// slice is valid until the next call. A last line without "\n" is returned
// before the read error. A line over maxLineBytes is reported once, as
// errLineTooLong, as soon as the limit is passed; the rest of it is
// skipped, and its "\n" comes back as an empty line, since that is when
// the line is complete (and counts as activity).
func (lr *lineReader) next() ([]byte, error) {
	for {
		pending := lr.buf[lr.r:lr.w]
		i := bytes.IndexByte(pending, '\n')
		switch {
		case lr.skip && i >= 0:
			lr.r += i + 1
			lr.skip = false
			return pending[:0], nil
		case lr.skip:
			lr.r = lr.w
		case i >= 0:
			line := trimCR(pending[:i])
			if len(line) > maxLineBytes {
				lr.r += i // its "\n" ends the skip on the next call
				lr.skip = true
				return nil, errLineTooLong
			}
			lr.r += i + 1
			return line, nil
		case len(pending) > maxLineBytes+1,
			len(pending) == maxLineBytes+1 && pending[maxLineBytes] != '\r':
			lr.r = lr.w
			lr.skip = true
			return nil, errLineTooLong
		}
		if lr.err != nil {
			if lr.r < lr.w { // the last line, without "\n"
				lr.r = lr.w
				return trimCR(pending), nil
			}
			return nil, lr.err
		}
		lr.fill()
	}
}

func trimCR(line []byte) []byte {
	if n := len(line); n > 0 && line[n-1] == '\r' {
		return line[:n-1]
	}
	return line
}

// fill reads once, after moving what is left to the front of a buffer of
// the right size.
func (lr *lineReader) fill() {
	if lr.buf == nil {
		lr.buf = lr.small[:]
	}
	lr.w = copy(lr.buf, lr.buf[lr.r:lr.w])
	lr.r = 0
	needBig := lr.busy || lr.w >= len(lr.small)
	switch {
	case needBig && lr.big == nil:
		lr.big = bigReads.Get().(*[bigReadBytes]byte)
		copy(lr.big[:], lr.buf[:lr.w])
		lr.buf = lr.big[:]
	case !needBig && lr.big != nil:
		copy(lr.small[:], lr.buf[:lr.w])
		lr.release()
	}
	n, err := lr.rd.Read(lr.buf[lr.w:])
	lr.w += n
	lr.busy = n >= len(lr.small)
	lr.err = err
}

// release gives the big buffer back; buf[r:w] must fit in small.
func (lr *lineReader) release() {
	if lr.big != nil {
		bigReads.Put(lr.big)
		lr.big = nil
		lr.buf = lr.small[:]
	}
}

// Cleaning lines.

// needsCleaning reports whether line holds invalid UTF-8 or a control
// character other than TAB (C0, DEL, C1). Most lines do not, and are used
// as they are, without a copy.
func needsCleaning(line []byte) bool {
	for i, c := range line {
		switch {
		case c < 0x20 && c != '\t', c == 0x7f:
			return true
		case c == 0xc2 && i+1 < len(line) && line[i+1] < 0xa0: // C1 is U+0080–U+009F: C2 80–C2 9F
			return true
		}
	}
	return !utf8.Valid(line)
}

// appendClean appends line to dst with each run of invalid UTF-8 replaced
// by one U+FFFD (as strings.ToValidUTF8 does) and then every control
// character but TAB removed, so that no user can drive another's terminal.
func appendClean(dst, line []byte) []byte {
	inInvalid := false
	for i := 0; i < len(line); {
		r, size := utf8.DecodeRune(line[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			if !inInvalid {
				dst = utf8.AppendRune(dst, utf8.RuneError)
			}
			inInvalid = true
		case unicode.IsControl(r) && r != '\t':
			inInvalid = false
		default:
			dst = append(dst, line[i:i+size]...)
			inInvalid = false
		}
		i += size
	}
	return dst
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

var (
	prefixRename = []byte("rename|")
	prefixTo     = []byte("to|")
)

// parseCommand tells what a cleaned line asks for. It only splits the line;
// the checks of each command are done where it runs.
func parseCommand(line []byte) command {
	switch {
	case len(line) == 0:
		return command{kind: cmdEmpty}
	case string(line) == "who":
		return command{kind: cmdWho}
	case bytes.HasPrefix(line, prefixRename):
		return command{kind: cmdRename, name: line[len(prefixRename):]}
	case bytes.HasPrefix(line, prefixTo):
		rest := line[len(prefixTo):]
		if i := bytes.IndexByte(rest, '|'); i >= 0 {
			return command{kind: cmdTo, name: rest[:i], text: rest[i+1:]}
		}
		return command{kind: cmdTo, name: rest}
	}
	return command{kind: cmdText, text: line}
}

// validName reports whether name may be chosen with rename|: 1 to
// maxNameRunes runes, valid UTF-8, and no white space, control character,
// or any of | : [ ] (so that no name looks like an address or forges the
// [addr]name: prefix).
func validName(name []byte) bool {
	n := 0
	for len(name) > 0 {
		r, size := utf8.DecodeRune(name)
		if r == utf8.RuneError && size == 1 || unicode.IsSpace(r) || unicode.IsControl(r) {
			return false
		}
		switch r {
		case '|', ':', '[', ']':
			return false
		}
		name = name[size:]
		n++
	}
	return n >= 1 && n <= maxNameRunes
}
