package main

import (
	"bytes"
	"errors"
	"io"
	"math"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
)

// User is one connection. Two goroutines serve it: serve reads and runs
// its lines; ListenMessage writes its output, and is the only goroutine
// that writes to conn. Its idle timer and the server's stop reach it from
// outside, so that neither waits for a write to a client that stopped
// reading.
type User struct {
	Name string // guarded by srv.mu; only this user's reader changes it
	Addr string
	conn net.Conn
	srv  *Server

	out      outbox
	in       lineReader
	idle     *time.Timer  // runs checkIdle; nil when srv.idle is 0
	lastLine atomic.Int64 // when the last complete line arrived, since srv.epoch
	reason   atomic.Pointer[string]
	idx      int // position in srv.members; owned by ListenMessager

	// Owned by ListenMessage.
	sending []*chunk    // the batch being written: sending[next].b[sent:] on
	next    int         // index of the first chunk not yet all written
	sent    int         // bytes of sending[next] already written
	iov     [4][]byte   // the chunks of one write
	bufs    net.Buffers // iov as writev takes it
}

func newUser(s *Server, conn net.Conn) *User {
	addr := conn.RemoteAddr().String()
	u := &User{Name: addr, Addr: addr, conn: conn, srv: s}
	u.out.wake = make(chan struct{}, 1)
	u.in.rd = conn
	u.lastLine.Store(s.now())
	if s.idle > 0 {
		// Made stopped and armed after the assignment, so checkIdle never
		// runs before u.idle is set.
		u.idle = time.AfterFunc(math.MaxInt64, u.checkIdle)
		u.idle.Reset(s.idle)
	}
	return u
}

// leaving records why u goes. The first reason wins; it reports whether
// this one did. Once a reason is set, u runs no more lines.
func (u *User) leaving(reason string) bool {
	return u.reason.CompareAndSwap(nil, &reason)
}

// serve is u's reader: it runs u's lines until the connection ends or u is
// told to go, and takes u out of the room.
func (u *User) serve() {
	s := u.srv
	err := u.readLines()
	switch {
	case err == io.EOF:
		u.leaving("closed by client")
	case err != nil:
		u.leaving("read failed: " + err.Error())
	}
	if u.idle != nil {
		u.idle.Stop()
	}
	s.Offline(u, *u.reason.Load())
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

// push queues line for u without ever blocking, and reports whether u's
// writer must be woken to write it. A user whose queue would pass
// maxQueuedBytes has stopped reading and is dropped.
func (u *User) push(line []byte) (wake bool) {
	wake, ok := u.out.push(line)
	if ok {
		return wake
	}
	if u.leaving("output queue over limit (client stopped reading)") {
		u.srv.log.Warn("drop", "addr", u.Addr, "reason", "slow reader", "limit_bytes", maxQueuedBytes)
	}
	// Closing is not writing: it ends a write in progress at once, and the
	// reader then fails and takes u out of the room.
	u.conn.Close()
	return false
}

// ListenMessage is u's writer: it hands u's queued lines to the kernel,
// all that waits at once, until the queue is sealed and written or a write
// fails. It sets no deadline and arms no timer: those run on the stack of
// the goroutine that does them, and a writer that never does them stays
// within the smallest goroutine stack while it waits.
func (u *User) ListenMessage() {
	defer u.conn.Close()
	for range u.out.wake {
		if !u.flush() {
			return
		}
	}
}

// checkIdle runs on u's idle timer: it kicks u if no line came for
// srv.idle, and otherwise sets the timer for the time left. The reader only
// stamps lastLine, so a line costs no timer operation.
func (u *User) checkIdle() {
	s := u.srv
	if u.reason.Load() != nil {
		return
	}
	if left := s.idle - time.Duration(s.now()-u.lastLine.Load()); left > 0 {
		u.idle.Reset(left)
		return
	}
	if u.leaving("idle") {
		s.log.Info("kick", "addr", u.Addr, "idle", s.idle)
		u.tell(replyKicked)
	}
}

// stop tells u that the server stops.
func (u *User) stop() {
	u.leaving("server stopping")
	u.tell(replyStopping)
}

// tell ends u from the server's side: final is its last line, and the
// reader is woken, so that u leaves the room now rather than once the last
// flush is done.
func (u *User) tell(final []byte) {
	u.finish(final)
	u.conn.SetReadDeadline(aLongTimeAgo)
}

// finish seals u's queue after final (if not nil) and gives the writer
// flushTimeout to write what is left; a write blocked on a client that
// stopped reading then fails.
func (u *User) finish(final []byte) {
	u.out.seal(final)
	u.conn.SetWriteDeadline(time.Now().Add(flushTimeout))
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

// writePiece bounds one write, so that what a client has taken stops
// counting against maxQueuedBytes after at most this much, even while the
// rest of a big batch is still on its way.
const writePiece = 64 << 10

// flush writes until the queue is empty. It reports whether u is still
// open: false once the queue is sealed and written, or a write failed.
func (u *User) flush() bool {
	for {
		if u.next == len(u.sending) {
			var first *chunk
			if len(u.sending) > 0 && cap(u.sending[0].b) == minChunk {
				first, u.sending[0] = u.sending[0], nil
				first.b = first.b[:0]
			}
			freeChunks(u.sending)
			var sealed bool
			u.sending, sealed = u.out.take(u.sending, first)
			u.next, u.sent = 0, 0
			if len(u.sending) == 0 {
				u.sending = shrink(u.sending)
				return !sealed
			}
		}
		if err := u.write(); err != nil {
			u.leaving("write failed: " + err.Error())
			u.out.seal(nil)
			rest, _ := u.out.take(nil, nil)
			freeChunks(rest)
			freeChunks(u.sending)
			u.sending = nil
			return false
		}
	}
}

// write hands the kernel the next piece of the batch: one chunk with
// write, several with one writev.
func (u *User) write() error {
	iov, size := u.iov[:0], 0
	for _, c := range u.sending[u.next:] {
		b := c.b
		if len(iov) == 0 {
			b = b[u.sent:]
		} else if len(iov) == len(u.iov) || size+len(b) > writePiece {
			break
		}
		iov = append(iov, b)
		size += len(b)
	}
	var n int64
	var err error
	if len(iov) == 1 {
		var k int
		k, err = u.conn.Write(iov[0])
		n = int64(k)
	} else {
		u.bufs = iov
		n, err = u.bufs.WriteTo(u.conn)
	}
	clear(u.iov[:])
	u.out.inflight.Add(-n)
	for n > 0 { // step past what was written
		left := int64(len(u.sending[u.next].b) - u.sent)
		if n < left {
			u.sent += int(n)
			break
		}
		n -= left
		u.next, u.sent = u.next+1, 0
	}
	return err
}

// outbox is a user's queue of unsent bytes. Its bound is in bytes, which a
// channel of lines cannot express (and a channel deep enough for 1 MiB of
// short lines would cost every user that depth up front), so the bytes
// wait in chunks and a channel of capacity one says there is something to
// write.
type outbox struct {
	mu       sync.Mutex
	pending  []*chunk     // in order; the last may have room
	first    *chunk       // an empty small chunk for the next first line, kept while busy
	queued   int          // bytes in pending
	inflight atomic.Int64 // bytes taken by the writer and not yet written
	sealed   atomic.Bool
	wake     chan struct{}
}

// push appends line unless the queue is sealed, and reports whether the
// queue was empty, so that the writer may be asleep. It reports ok false,
// and seals the queue, when line would take it past maxQueuedBytes.
func (o *outbox) push(line []byte) (wasEmpty, ok bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.sealed.Load() {
		return false, true
	}
	if o.queued+int(o.inflight.Load())+len(line) > maxQueuedBytes {
		o.sealed.Store(true)
		freeChunks(o.pending)
		o.pending, o.queued = nil, 0
		return false, false
	}
	wasEmpty = len(o.pending) == 0
	o.appendLocked(line)
	return wasEmpty, true
}

func (o *outbox) appendLocked(line []byte) {
	o.queued += len(line)
	for len(line) > 0 {
		n := len(o.pending)
		if n == 0 || len(o.pending[n-1].b) == cap(o.pending[n-1].b) {
			var c *chunk
			if n == 0 && o.first != nil {
				c, o.first = o.first, nil
			} else {
				c = newChunk(n)
			}
			o.pending = append(o.pending, c)
			n++
		}
		last := o.pending[n-1]
		k := copy(last.b[len(last.b):cap(last.b)], line)
		last.b = last.b[:len(last.b)+k]
		line = line[k:]
	}
}

// empty reports whether everything queued has been written.
func (o *outbox) empty() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.queued == 0 && o.inflight.Load() == 0
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

// take hands the writer every chunk that waits, in spare's place, and
// says whether the queue is sealed (so nothing more will come once these
// are written). first is the small first chunk of the batch just written,
// emptied: while more waits, the queue keeps it for its next first line,
// which then costs no trip through the pool (a connect storm is a long run
// of one-line batches); once nothing waits, the writer is about to sleep
// and it goes back, so an idle user holds no chunk.
func (o *outbox) take(spare []*chunk, first *chunk) (chunks []*chunk, sealed bool) {
	o.mu.Lock()
	chunks = o.pending
	o.pending = spare[:0]
	o.inflight.Store(int64(o.queued))
	o.queued = 0
	sealed = o.sealed.Load()
	unused := [2]*chunk{first}
	switch {
	case len(chunks) == 0:
		unused[1], o.first = o.first, nil
	case o.first == nil:
		o.first, unused[0] = first, nil
	}
	o.mu.Unlock()
	freeChunks(unused[:])
	return chunks, sealed
}

// chunk is a piece of a user's queue. Its capacity is fixed by its class:
// a queue's first chunk is small (a line, or the few lines of a connect
// storm), and each next one twice the last, up to 16 KiB. Each class has
// its own pool, so a chunk that served one user's burst never sits half
// empty in another's queue, and a queue grows without copying.
type chunk struct{ b []byte }

const (
	minChunk     = 512
	chunkClasses = 6 // 512 B to 16 KiB
)

var chunkPools [chunkClasses]sync.Pool

// newChunk returns an empty chunk to follow n others in a queue.
func newChunk(n int) *chunk {
	class := min(n, chunkClasses-1)
	if c, ok := chunkPools[class].Get().(*chunk); ok {
		return c
	}
	return &chunk{b: make([]byte, 0, minChunk<<class)}
}

func freeChunks(chunks []*chunk) {
	for i, c := range chunks {
		if c == nil {
			continue
		}
		c.b = c.b[:0]
		chunkPools[bits.Len(uint(cap(c.b)/minChunk))-1].Put(c)
		chunks[i] = nil
	}
}

// shrink keeps a short list for reuse and lets a long one (left by a
// burst) go, so that an idle user holds nothing a burst grew.
func shrink[T any](list []T) []T {
	if cap(list) > 8 {
		return nil
	}
	return list[:0]
}

// Reading lines.

const (
	// smallReadBytes is the buffer an idle connection waits with: enough
	// for a typed line, so that a chat line costs one read.
	smallReadBytes = 256
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
