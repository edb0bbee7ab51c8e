package main

import (
	"bytes"
	"errors"
	"io"
	"math/bits"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"
)

// User is one connection. Two goroutines serve it:
//
//   - read, the reader: it reads lines, cleans and parses them, and runs
//     them (DoMessage);
//   - Server.Handler: the select loop that kicks the user when no line
//     came for srv.idle, and writes what waits in the user's queue
//     (ListenMessage) whenever the queue says there is something: it is
//     the only goroutine that writes to conn.
type User struct {
	Name    string // guarded by srv.mu; only u's reader changes it
	Addr    string
	addrKey netip.Prefix // the address u counts against (-max-conns-per-ip)
	conn    net.Conn
	srv     *Server

	out outbox
	in  lineReader
	w   writer

	why  atomic.Uint32 // the reason u left (a reason), 0 while u is online
	err  error         // what failed, if that is why u left; set before done is closed
	done chan struct{} // closed once u leaves

	toWake []*User      // writers u's reader queued lines for, to wake before it reads
	inHub  atomic.Int32 // u's messages that ListenMessager has not handed out yet
	joined atomic.Bool  // ListenMessager has handed out u's 已上线
	idx    int          // u's place in srv.members; ListenMessager's

	lastLineAt atomic.Int64 // when the last complete line came, since srv.epoch
	budget     bucket       // flood control; the reader's
	pause      *time.Timer  // the reader's wait for its budget, made at the first

	// Handler's own.
	idle     *time.Timer // nil when nobody is kicked
	offlined bool        // Offline has been called
	reader   sync.WaitGroup
}

func newUser(s *Server, conn net.Conn) *User {
	addr := conn.RemoteAddr().String()
	u := &User{Name: addr, Addr: addr, conn: conn, srv: s, done: make(chan struct{})}
	u.out.wake = make(chan struct{}, 1)
	u.lastLineAt.Store(int64(s.since()))
	u.in.rd = conn
	u.in.beforeRead = u.wakeQueued
	if s.idle > 0 {
		u.idle = time.NewTimer(s.idle)
	}
	return u
}

// reason says why a user left.
type reason uint32

const (
	online reason = iota
	reasonClosed
	reasonReset
	reasonReadFailed
	reasonIdle
	reasonSlowReader
	reasonStalled
	reasonStopping
	reasonWriteFailed
	reasons // how many
)

var reasonText = [...]string{
	online:            "online",
	reasonClosed:      "closed by client",
	reasonReset:       "reset by client",
	reasonReadFailed:  "read failed",
	reasonIdle:        "idle",
	reasonSlowReader:  "slow reader",
	reasonStalled:     "stalled",
	reasonStopping:    "server stopping",
	reasonWriteFailed: "write failed",
}

func (r reason) String() string { return reasonText[r] }

// leave records why u goes, with the error if one caused it. The first
// reason wins; it reports whether this one did. Once u has left it runs
// no more lines, and Handler takes it out of the room.
func (u *User) leave(r reason, err error) bool {
	if !u.why.CompareAndSwap(uint32(online), uint32(r)) {
		return false
	}
	u.err = err
	close(u.done)
	return true
}

func (u *User) gone() bool { return u.why.Load() != uint32(online) }

func (u *User) reason() reason { return reason(u.why.Load()) }

// read is u's reader. It runs u's lines one at a time, in order, until the
// connection ends. Once u has left it runs nothing more, but reads on and
// drops what comes until the client closes or the deadline set when u
// left passes (see linger): closing a connection with input unread resets
// it, and a reset can destroy the last lines (R8, R10) before the client
// reads them.
func (u *User) read() {
	for {
		line, err := u.in.next()
		switch {
		case err != nil && err != errLineTooLong && err != errLineEnd:
			u.wakeQueued() // for the last line, which came without "\n"
			if u.leave(readReason(err), err) {
				// The client is going: what is queued for it (the replies
				// to its last lines) gets flushTimeout.
				u.out.mu.Lock()
				u.deadlineLocked(time.Now().Add(flushTimeout))
				u.out.mu.Unlock()
			}
			return
		case u.gone():
		case err == errLineTooLong:
			if u.pace(tooLongUnits, u.srv.since()) {
				u.reply(replyTooLong)
			}
		default:
			at := u.arrived()
			if err == nil {
				u.DoMessage(line, at)
			}
		}
	}
}

// wakeQueued wakes the writers of the lines u's reader has queued. The
// reader does it before it waits for input: a client that sends many
// lines at once (a paste, a pipelined client) then costs each recipient
// one wake and one write for all of them, not one per line.
func (u *User) wakeQueued() {
	if u.toWake = wakeAll(u.toWake); cap(u.toWake) > 16 {
		u.toWake = nil // a burst's list does not stay with the user
	}
}

func readReason(err error) reason {
	switch {
	case err == io.EOF:
		return reasonClosed
	case errors.Is(err, syscall.ECONNRESET):
		return reasonReset
	}
	return reasonReadFailed
}

// arrived notes a complete line, which is activity for the idle kick,
// and returns when it came. A line costs no timer: Handler's idle timer,
// when it fires, looks at when the last line came.
func (u *User) arrived() time.Duration {
	u.srv.stats.linesIn.Add(1)
	at := u.srv.since()
	u.lastLineAt.Store(int64(at))
	return at
}

// DoMessage runs one line, which came at at: clean it, pay for it, then do
// what it says.
func (u *User) DoMessage(line []byte, at time.Duration) {
	s := u.srv
	size := len(line) // as received
	if needsCleaning(line) {
		line = appendClean(nil, line)
	}
	cmd := parseCommand(line)
	if !u.pace(s.cost(cmd.kind, size), at) {
		return // u left while the line waited
	}
	switch cmd.kind {
	case cmdEmpty:
	case cmdWho:
		s.sendTo(u, u, s.who(), true)
	case cmdRename:
		u.rename(cmd.name)
	case cmdTo:
		u.whisper(cmd.name, cmd.text)
	default:
		s.BroadCast(u, line)
	}
}

func (u *User) reply(line []byte) { u.srv.sendTo(u, u, line, false) }

// pace is flood control: it waits until u's budget holds cost units, and
// takes them. Meanwhile the reader reads nothing more, so TCP slows the
// sender down; nothing is dropped, and the order is kept. It reports
// false if u left while it waited: the line is not run, and the reader
// goes back to reading.
func (u *User) pace(cost int, now time.Duration) bool {
	s := u.srv
	if s.unitEvery == 0 {
		return true
	}
	wait := u.budget.reserve(now, cost, s.unitEvery, budgetUnits)
	if wait == 0 {
		return true
	}
	s.stats.waited.Add(1)
	u.wakeQueued() // what u's lines queued goes out now, not after the wait
	if u.pause == nil {
		u.pause = time.NewTimer(wait)
	} else {
		u.pause.Reset(wait)
	}
	select {
	case <-u.pause.C:
		return true
	case <-u.done:
		u.pause.Stop()
		return false
	}
}

func (u *User) rename(name []byte) {
	s := u.srv
	if !validName(name) {
		u.reply(replyBadName)
		return
	}
	old := u.Name
	if err := s.rename(u, string(name)); err != nil {
		u.reply(replyNameTaken)
		return
	}
	s.log.Info("rename", "addr", u.Addr, "old", old, "new", u.Name)
	line := make([]byte, 0, len("您已更新用户名：")+len(name)+1)
	line = append(line, "您已更新用户名："...)
	line = append(line, name...)
	u.reply(append(line, '\n'))
}

// whisper runs to|name|text; the checks go in the order PROTOCOL.md gives.
func (u *User) whisper(name, text []byte) {
	s := u.srv
	if len(name) == 0 {
		u.reply(replyBadFormat)
		return
	}
	to := s.lookup(name)
	switch {
	case to == nil:
		u.reply(replyNoUser)
	case len(text) == 0:
		u.reply(replyNoText)
	default:
		line := make([]byte, 0, len(u.Name)+len("对您说:")+len(text)+1)
		line = append(line, u.Name...)
		line = append(line, "对您说:"...)
		line = append(line, text...)
		s.sendTo(u, to, append(line, '\n'), false)
	}
}

// userLine formats "[addr]name:text\n" as a line of its own. Only u's
// reader, or its Handler before the reader starts, may call it: they are
// the goroutines that see u.Name without the lock.
func (u *User) userLine(text []byte) []byte {
	line := make([]byte, 0, len(u.Addr)+len(u.Name)+len(text)+4)
	line = append(line, '[')
	line = append(line, u.Addr...)
	line = append(line, ']')
	line = append(line, u.Name...)
	line = append(line, ':')
	line = append(line, text...)
	return append(line, '\n')
}

// The idle kick and the writer, both on Handler's goroutine.

// checkIdle runs when u's idle timer fires, or when a write gives up at
// the kick's time: it kicks u if no line came for srv.idle, and otherwise
// sets the timer for the time left.
func (u *User) checkIdle() {
	s := u.srv
	if u.gone() {
		return
	}
	if left := s.idle - time.Since(u.lastLine()); left > 0 {
		u.idle.Reset(left)
		return
	}
	if u.leave(reasonIdle, nil) {
		s.log.Info("kick", "addr", u.Addr, "idle", s.idle)
		u.seal(replyKicked)
		u.offline() // out of the room now, not after the last flush
	}
}

func (u *User) lastLine() time.Time {
	return u.srv.epoch.Add(time.Duration(u.lastLineAt.Load()))
}

// offline takes u out of the room, once. u has left: whoever won leave
// closes done once it has set the error, which Offline logs.
func (u *User) offline() {
	if !u.offlined {
		u.offlined = true
		<-u.done
		u.srv.Offline(u)
	}
}

// outbox is a user's outbound queue, the course's channel C. Its bound is
// in bytes, which a channel of lines cannot express (and a channel deep
// enough for 1 MiB of short lines would cost every user that depth up
// front), so the lines wait in chunks and a channel of capacity one says
// there is something to write. Everything but wake is guarded by mu.
//
// What counts against the bound is queued+inflight: the bytes not yet
// written. srv.queued sums it over all users.
type outbox struct {
	mu       sync.Mutex
	chunks   []*chunk  // the lines waiting, in order; the last may have room
	queued   int       // bytes in chunks
	lines    int       // lines in chunks
	inflight int       // bytes the writer has taken and not written yet
	sealed   bool      // nothing more is queued: once it is written the writer ends
	stallAt  time.Time // the batch being written stalls: the client took nothing since stallTimeout
	deadline time.Time // the write deadline nextBatch set
	final    time.Time // once u leaves, the deadline of reads and writes; only moves earlier
	wake     chan struct{}
}

// push queues line for u without ever blocking. It reports whether u took
// the line, and whether u's writer may be asleep and must be woken. u does
// not take it once its queue is sealed, or when line would take what
// waits past bound: then u has stopped reading and is dropped. A who reply
// (whole) is taken whole if less than bound waited before it, so that a
// user's own who never drops it.
func (u *User) push(line []byte, bound int, whole bool) (took, wake bool) {
	o := &u.out
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.sealed {
		return false, false
	}
	waiting := o.queued + o.inflight
	if waiting+len(line) > bound && !(whole && waiting < bound) {
		u.leave(reasonSlowReader, nil)
		u.abortLocked()
		return false, false
	}
	wake = o.queued == 0
	o.appendLocked(line)
	if o.lines++; whole { // a who reply: many lines
		o.lines += bytes.Count(line, []byte("\n")) - 1
	}
	return true, wake
}

func (o *outbox) appendLocked(line []byte) {
	o.queued += len(line)
	for len(line) > 0 {
		n := len(o.chunks)
		if n == 0 || len(o.chunks[n-1].b) == cap(o.chunks[n-1].b) {
			o.chunks = append(o.chunks, newChunk(n))
			n++
		}
		last := o.chunks[n-1]
		k := copy(last.b[len(last.b):cap(last.b)], line)
		last.b = last.b[:len(last.b)+k]
		line = line[k:]
	}
}

func (u *User) wakeWriter() {
	select {
	case u.out.wake <- struct{}{}:
	default:
	}
}

// seal ends u's queue after final (if not nil): the writer writes what
// waits, then final, then stops. From now on the writer and the lingering
// reader have flushTimeout left, so that a client that stopped reading
// holds nothing up for longer.
func (u *User) seal(final []byte) {
	o := &u.out
	o.mu.Lock()
	if !o.sealed {
		o.sealed = true
		o.appendLocked(final)
		u.srv.queued.Add(int64(len(final)))
	}
	u.deadlineLocked(time.Now().Add(flushTimeout))
	o.mu.Unlock()
	u.wakeWriter()
}

// abortLocked drops what waits for u and ends its connection's reads and
// writes at once, so that u leaves now; u.out.mu is held.
func (u *User) abortLocked() {
	o := &u.out
	o.sealed = true
	u.srv.queued.Add(-int64(o.queued))
	freeChunks(o.chunks)
	o.chunks, o.queued, o.lines = nil, 0, 0
	u.deadlineLocked(aLongTimeAgo)
	u.wakeWriter()
}

// deadlineLocked moves the connection's deadline to d unless it is already
// earlier; u.out.mu is held.
func (u *User) deadlineLocked(d time.Time) {
	o := &u.out
	if o.final.IsZero() || d.Before(o.final) {
		o.final = d
		u.conn.SetDeadline(d)
	}
}

// aLongTimeAgo is a deadline that has passed: it ends a blocked read or
// write at once.
var aLongTimeAgo = time.Unix(1, 0)

// ListenMessage writes the batch nextBatch took (or the rest of it, after
// a timeout), in pieces of whole chunks, each one write (writev for
// several). It reports false once u's connection is done with: the last
// batch is written, or a write failed. Handler runs both when the queue
// says there is something, so Handler's goroutine is the only one that
// writes to conn.
func (u *User) ListenMessage() bool {
	w := &u.w
	for len(w.bufs) > 0 || w.next < len(w.batch) {
		if len(w.bufs) == 0 {
			w.piece()
		}
		var n int64
		var err error
		if len(w.bufs) == 1 { // the common case, and no iovec for it
			var k int
			k, err = u.conn.Write(w.bufs[0])
			if w.bufs[0], n = w.bufs[0][k:], int64(k); len(w.bufs[0]) == 0 {
				w.bufs = w.bufs[:0]
			}
		} else {
			n, err = w.bufs.WriteTo(u.conn) // consumes what it wrote
		}
		u.wrote(int(n))
		w.took = w.took || n > 0
		if err != nil {
			return u.timedOut(err)
		}
	}
	clear(w.iov[:])
	freeChunks(w.batch)
	u.srv.stats.linesOut.Add(int64(w.lines))
	return !w.last
}

// nextBatch takes what waits in u's queue for ListenMessage, unless the
// last batch is not all written, and sets the deadline of the writes:
// the earliest of the batch's stall (stallTimeout after it began, or
// after the client last took some of it) and the idle kick, unless u is
// leaving and its deadline is set already. It reports false if the queue
// is sealed and written. Handler calls it from its own frame: setting a
// deadline goes deep into the runtime, and the write path must fit in the
// smallest stack (see Handler).
//
// The deadline is moved only when it moves by deadlineSlack or more, so
// that a user who gets a line every few milliseconds costs a timer change
// a second rather than one per line (latency p99 1.33× → 1.10× the limit
// server's, compare.sh). A deadline left in place fires up to that much
// early, and the write then resumes with an exact one (a TLS connection
// cannot resume: its client is dropped, up to a second early).
func (u *User) nextBatch() bool {
	o, w := &u.out, &u.w
	o.mu.Lock()
	defer o.mu.Unlock()
	now := time.Now()
	if len(w.bufs) == 0 && w.next == len(w.batch) {
		w.batch, o.chunks = o.chunks, w.batch[:0]
		o.inflight, o.queued = o.queued, 0
		w.lines, o.lines = o.lines, 0
		w.next, w.last = 0, o.sealed
		if len(w.batch) == 0 {
			// The list and the queue's swap places batch after batch:
			// short ones stay for reuse (dropping them made a connect
			// storm's garbage twice its peak's worth of queued lines); a
			// long one, left by a burst, goes.
			if cap(w.batch) > 4 {
				w.batch = nil
			}
			return !o.sealed
		}
		o.stallAt = now.Add(stallTimeout)
	}
	if !o.final.IsZero() {
		return true
	}
	if o.stallAt.IsZero() { // the client took some of the batch
		o.stallAt = now.Add(stallTimeout)
	}
	w.took = false
	d := o.stallAt
	if u.idle != nil {
		if kick := u.lastLine().Add(u.srv.idle); kick.Before(d) {
			d = kick
		}
	}
	if d.Before(o.deadline) || d.Sub(o.deadline) >= deadlineSlack {
		o.deadline = d
		u.conn.SetWriteDeadline(d)
	}
	return true
}

// deadlineSlack: see nextBatch.
const deadlineSlack = time.Second

// writePiece bounds one write: what the client has taken stops counting
// against the bound after at most this much.
const writePiece = 64 << 10

// piece sets w.bufs to the next chunks of the batch, at most len(w.iov)
// of them and writePiece bytes (or one chunk).
func (w *writer) piece() {
	w.bufs = w.iov[:0]
	size := 0
	for ; w.next < len(w.batch) && len(w.bufs) < len(w.iov); w.next++ {
		b := w.batch[w.next].b
		if len(w.bufs) > 0 && size+len(b) > writePiece {
			break
		}
		w.bufs = append(w.bufs, b)
		size += len(b)
	}
}

// timedOut decides what a failed write means. A timeout is a stall only
// if the client took nothing since the deadline was set, stallTimeout
// before (so a client that stopped reading is dropped between 2 and 4
// minutes after the last byte it took, and at 2 if it took none); at the
// kick's time, u is kicked; otherwise (the client took some, or a line
// moved the kick) the rest of the batch gets a new deadline. It reports
// whether u's connection goes on.
func (u *User) timedOut(err error) bool {
	o := &u.out
	o.mu.Lock()
	now := time.Now()
	if u.w.took {
		o.stallAt = time.Time{} // nextBatch starts the clock again
	}
	stalled := !o.stallAt.IsZero() && !now.Before(o.stallAt)
	leaving := !o.final.IsZero()
	early := now.Before(o.deadline) // a timeout that stays (TLS's)
	o.mu.Unlock()
	switch {
	case !errors.Is(err, os.ErrDeadlineExceeded) || early && !leaving:
		u.fail(reasonWriteFailed, err)
		return false
	case leaving || stalled:
		u.fail(reasonStalled, err)
		return false
	case u.idle != nil && !u.gone() && time.Since(u.lastLine()) >= u.srv.idle:
		u.checkIdle()
	}
	u.wakeWriter() // the rest of the batch waits
	return true
}

func (u *User) wrote(n int) {
	o := &u.out
	o.mu.Lock()
	o.inflight -= n
	o.mu.Unlock()
	u.srv.queued.Add(-int64(n))
	u.srv.stats.bytesOut.Add(int64(n))
}

// writer is what ListenMessage keeps between batches, so that a writev
// costs no allocation.
type writer struct {
	batch []*chunk
	lines int  // lines in batch
	next  int  // batch[next] is the first chunk not in bufs yet
	last  bool // the queue was sealed when batch was taken: nothing follows it
	took  bool // the client took some of the batch since the deadline was set
	iov   [4][]byte
	bufs  net.Buffers // the piece being written, what is left of it
}

// fail ends u after a write failed: nothing more will be written.
func (u *User) fail(r reason, err error) {
	u.leave(r, err)
	w := &u.w
	freeChunks(w.batch)
	clear(w.iov[:])
	w.batch, w.next, w.bufs = nil, 0, nil
	o := &u.out
	o.mu.Lock()
	u.srv.queued.Add(-int64(o.inflight))
	o.inflight = 0
	u.abortLocked()
	o.mu.Unlock()
}

// linger ends u's connection once its last line is written: it tells the
// client that nothing more comes, and leaves the reader lingerTimeout to
// read what the client still sends, so that the close does not reset the
// connection while the last lines may still be on their way.
func (u *User) linger() {
	closeWrite(u.conn)
	u.out.mu.Lock()
	u.deadlineLocked(time.Now().Add(lingerTimeout))
	u.out.mu.Unlock()
}

// closeWrite tells the client that nothing more comes (TCP's FIN, TLS's
// close_notify) while its input can still be read. A connection that
// cannot half-close (net.Pipe) is closed.
func closeWrite(conn net.Conn) {
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		return
	}
	conn.Close()
}

// chunk is a piece of a user's queue. A queue's first chunk is small (a
// line, or the few lines of a connect storm) and each next one twice the
// last, up to 16 KiB: a queue of n bytes holds at most about 2n, and grows
// without copying. Each size has its own pool, so that a chunk that served
// one user's burst never sits half empty in another's queue; without the
// pools, fan-out fell from 0.87× to 0.58× of the limit server's
// (compare.sh), for the allocations and collections. (A first chunk that
// grows by copying, for one write per batch, left each user's smaller
// sizes idle in the pools through a connect storm: a fifth more memory at
// its peak.)
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

// freeChunks gives written chunks back to their pools.
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

// Reading lines.

const (
	// smallReadBytes is the buffer a connection waits for input with:
	// enough for a typed line, so that a chat line costs one read.
	smallReadBytes = 256
	// bigReadBytes is the buffer used while more input waits than the small
	// one holds. It holds an over-long line's first maxLineBytes+1 bytes
	// with room to read more.
	bigReadBytes = 2 * maxLineBytes
)

var (
	errLineTooLong = errors.New("line too long")
	errLineEnd     = errors.New("end of a line too long")
)

// lineReader cuts a byte stream into lines of at most maxLineBytes. It
// waits for input in a small buffer of its own and takes a big one only
// while more input waits than that holds, so an idle connection holds no
// read buffer it does not use.
type lineReader struct {
	rd         io.Reader
	beforeRead func() // if not nil, called before each read
	buf        []byte // small[:] or big[:]
	r, w       int    // buf[r:w] is read and not yet returned
	big        *[bigReadBytes]byte
	full       bool  // the last read filled buf: more input is likely waiting
	skip       bool  // inside an over-long line: drop bytes up to its "\n"
	err        error // the read error, returned once the buffered lines are
	small      [smallReadBytes]byte
}

// next returns the next line, without its "\n" and one "\r" before it; the
// slice is valid until the next call. A last line without "\n" is returned
// before the read error. A line over maxLineBytes is reported as
// errLineTooLong as soon as the limit is passed, the rest of it is
// skipped, and errLineEnd reports its "\n", since that is when the line is
// complete (and counts as activity).
func (lr *lineReader) next() ([]byte, error) {
	for {
		pending := lr.buf[lr.r:lr.w]
		i := bytes.IndexByte(pending, '\n')
		switch {
		case lr.skip && i >= 0:
			lr.r += i + 1
			lr.skip = false
			return nil, errLineEnd
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
// the right size: the big one while the last read filled the buffer or
// what is left does not fit the small one, the small one otherwise.
func (lr *lineReader) fill() {
	if lr.buf == nil {
		lr.buf = lr.small[:]
	}
	lr.w = copy(lr.buf, lr.buf[lr.r:lr.w])
	lr.r = 0
	needBig := lr.full || lr.w >= len(lr.small)
	switch {
	case needBig && lr.big == nil:
		lr.big = new([bigReadBytes]byte)
		copy(lr.big[:], lr.buf[:lr.w])
		lr.buf = lr.big[:]
	case !needBig && lr.big != nil:
		copy(lr.small[:], lr.buf[:lr.w])
		lr.big = nil
		lr.buf = lr.small[:]
	}
	if lr.beforeRead != nil {
		lr.beforeRead()
	}
	n, err := lr.rd.Read(lr.buf[lr.w:])
	lr.w += n
	lr.full = lr.w == len(lr.buf)
	lr.err = err
}

// Cleaning lines.

// needsCleaning reports whether line holds invalid UTF-8, a control
// character other than TAB (C0, DEL, C1) or a bidi control. Most lines do
// not, and are used as they are, without a copy.
func needsCleaning(line []byte) bool {
	for i, c := range line {
		switch {
		case c < 0x20 && c != '\t', c == 0x7f:
			return true
		case c == 0xc2 && i+1 < len(line) && line[i+1] < 0xa0: // C1 is U+0080–U+009F: C2 80–C2 9F
			return true
		case c == 0xe2 && i+2 < len(line) && isBidiControl(rune(line[i+1])<<8|rune(line[i+2])):
			return true
		}
	}
	return !utf8.Valid(line)
}

// isBidiControl reports whether r is a bidi embedding, override or isolate
// control (U+202A–U+202E, U+2066–U+2069), which could reverse how the rest
// of a line is shown. needsCleaning calls it with the last two bytes of a
// three-byte UTF-8 sequence that starts with E2.
func isBidiControl(r rune) bool {
	switch {
	case r >= 0x202a && r <= 0x202e, r >= 0x2066 && r <= 0x2069: // the runes
		return true
	case r >= 0x80aa && r <= 0x80ae, r >= 0x81a6 && r <= 0x81a9: // E2 80 AA–AE, E2 81 A6–A9
		return true
	}
	return false
}

// appendClean appends line to dst with each run of invalid UTF-8 replaced
// by one U+FFFD (as strings.ToValidUTF8 does) and then every control
// character but TAB, and every bidi control, removed, so that no user can
// drive another's terminal or turn another's text around.
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
		case unicode.IsControl(r) && r != '\t', isBidiControl(r):
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

// validName reports whether name may be chosen with rename| (PROTOCOL.md,
// Users): so that no name looks like an address, forges the [addr]name:
// prefix, or passes for another name in who or in a whisper.
func validName(name []byte) bool {
	n := 0
	var scripts []string // the scripts of its letters, Common and Inherited aside
	for i := 0; i < len(name); n++ {
		r, size := utf8.DecodeRune(name[i:])
		i += size
		switch {
		case r == utf8.RuneError && size == 1,
			unicode.IsSpace(r),
			unicode.Is(unicode.C, r), // Cc, Cf, Co, and in Go's tables Cn too
			n == 0 && unicode.Is(unicode.M, r):
			return false
		}
		switch r {
		case '|', ':', '[', ']',
			'｜', '∣', '：', '∶', '꞉', 'ː', '˸', '﹕', '︓', '։', '׃', '［', '］', // look alike
			0x115f, 0x1160, 0x3164, 0xffa0, 0x2800: // show as nothing
			return false
		}
		if sc := scriptOf(r); sc != "" && !slices.Contains(scripts, sc) {
			scripts = append(scripts, sc)
		}
	}
	return n >= 1 && n <= maxNameRunes && oneScript(scripts)
}

// scriptOf returns the script of r, or "" for the Common and Inherited
// scripts (digits, punctuation, emoji, combining accents…).
func scriptOf(r rune) string {
	if unicode.In(r, unicode.Common, unicode.Inherited) {
		return ""
	}
	for name, table := range unicode.Scripts {
		if unicode.Is(table, r) {
			return name
		}
	}
	return ""
}

// scriptMixes are the scripts that may be mixed in a name: each is how one
// language is written.
var scriptMixes = [][]string{
	{"Latin", "Han", "Hiragana", "Katakana"}, // Japanese
	{"Latin", "Han", "Hangul"},               // Korean
	{"Latin", "Han", "Bopomofo"},             // Chinese with zhuyin
}

// oneScript reports whether a name's scripts are one, or fit one mix.
func oneScript(scripts []string) bool {
	if len(scripts) <= 1 {
		return true
	}
	for _, mix := range scriptMixes {
		fits := true
		for _, sc := range scripts {
			fits = fits && slices.Contains(mix, sc)
		}
		if fits {
			return true
		}
	}
	return false
}

// foldName is the key that makes names unique: full-width ASCII
// (U+FF01–U+FF5E) becomes ASCII, and each rune the smallest of its case
// folding (unicode.SimpleFold), so that two names have one key exactly
// when strings.EqualFold finds them equal, width aside.
func foldName(name string) string {
	b := make([]rune, 0, len(name))
	for _, r := range name {
		if r >= 0xff01 && r <= 0xff5e {
			r -= 0xff01 - 0x21
		}
		least := r
		for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
			least = min(least, f)
		}
		b = append(b, least)
	}
	return string(b)
}
