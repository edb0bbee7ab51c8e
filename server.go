package main

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Limits. Each one bounds what a single client can make the server hold or
// wait for; PROTOCOL.md fixes the first three.
const (
	// maxLineBytes is the longest line a client may send, its "\n" and a
	// "\r" before it excluded. A longer line is discarded and answered R7.
	maxLineBytes = 4096
	// maxQueuedBytes bounds the output waiting in the server for one user.
	// A user whose queue would pass it has stopped reading: it is
	// disconnected at once, so that nobody else ever waits for it.
	maxQueuedBytes = 1 << 20
	// maxNameRunes is the longest name rename| accepts.
	maxNameRunes = 32
	// stallTimeout drops a user whose connection has taken none of its
	// waiting output for this long: its client or its network is stuck.
	stallTimeout = 2 * time.Minute
	// flushTimeout bounds the last flush to a user who is leaving, is
	// kicked, or is told that the server stops, and the lingering read
	// after it.
	flushTimeout = 3 * time.Second
	// shutdownTimeout bounds how long Serve waits for its connections once
	// it stops: the process must be gone within 5 s of the signal.
	shutdownTimeout = 4 * time.Second
	// lingerTimeout bounds the time a connection is kept open after its
	// last line (R8, R9, R10…) is written, reading what the client still
	// sends, so that closing it does not reset it.
	lingerTimeout = time.Second
	// messageQueue is the capacity of s.Message. A reader that finds it
	// full waits; ListenMessager never blocks, so the wait lasts only as
	// long as the lines ahead of it take to hand out.
	messageQueue = 1024
	// roundLines and roundDeliveries bound a round of ListenMessager: the
	// messages it hands out while more wait, and the deliveries (a few
	// milliseconds of work), before it wakes the writers it gave lines to.
	roundLines      = 64
	roundDeliveries = 1 << 17
)

// The replies of PROTOCOL.md (R1–R10 but R3, which carries the new name),
// each a whole line.
var (
	replyBadName   = []byte("用户名不合法：1-32个字符，不能包含空白和 | : [ ]\n") // R1
	replyNameTaken = []byte("当前用户名被使用了\n")                      // R2
	replyBadFormat = []byte("消息格式不正确\n")                        // R4
	replyNoUser    = []byte("不存在该用户\n")                         // R5
	replyNoText    = []byte("无消息内容，请重发\n")                      // R6
	replyTooLong   = []byte("消息过长\n")                           // R7
	replyKicked    = []byte("你被踢出了\n")                          // R8
	replyFull      = []byte("服务器已满，请稍后再试\n")                    // R9
	replyStopping  = []byte("服务器即将关闭\n")                        // R10
)

var errNameTaken = errors.New("name taken")

// Config holds the server's limits. The zero value of each turns it off.
type Config struct {
	Idle     time.Duration // kick a user after this long without a line
	MaxConns int           // most users online at once
}

// Server is the chat room: who is online, and the one goroutine that hands
// out every broadcast.
//
// Lock order: s.mu and a user's out.mu are never held together.
type Server struct {
	log      *slog.Logger
	idle     time.Duration
	maxConns int
	epoch    time.Time // User.lastLineAt counts from here

	mu        sync.Mutex
	OnlineMap map[string]*User // by name
	version   int              // counts changes of OnlineMap
	whoReply  []byte           // built for version, nil after a change

	Message chan message // drained by ListenMessager alone
	conns   atomic.Int64 // users counted against maxConns
	queued  atomic.Int64 // bytes waiting in all users' queues
	stats   stats
	wg      sync.WaitGroup

	// ListenMessager's own.
	members  []*User // who gets broadcasts
	stopping bool    // the stop was handed out: leavers are not announced
	toWake   []*User // writers to wake at the end of the round
	round    int     // deliveries made in the round
}

// NewServer returns a server that logs to log and keeps the limits of cfg.
func NewServer(log *slog.Logger, cfg Config) *Server {
	return &Server{
		log:       log,
		idle:      cfg.Idle,
		maxConns:  cfg.MaxConns,
		epoch:     time.Now(),
		OnlineMap: make(map[string]*User),
		Message:   make(chan message, messageQueue),
	}
}

// stats counts what the server did, for releaseMemory.
type stats struct {
	accepted atomic.Int64 // connections that became users
	linesIn  atomic.Int64 // complete lines received
	bytesOut atomic.Int64 // bytes written to users
}

type msgKind uint8

const (
	msgAll      msgKind = iota // line goes to every member
	msgTo                      // line goes to user to alone
	msgJoin                    // from becomes a member, then line goes to every member
	msgLeave                   // to stops being a member, then line goes to the rest
	msgShutdown                // every member is told the server stops
	msgStop                    // ListenMessager returns
)

// message is one line for ListenMessager to hand out.
type message struct {
	kind  msgKind
	from  *User // whose message it is: from.inHub counts it
	to    *User
	line  []byte // not changed once queued
	whole bool   // a who reply: see User.push
}

// Serve accepts connections on ln until ctx is done or ln fails, then stops:
// every user gets R10 after what is queued for it, for at most flushTimeout,
// and Serve returns within shutdownTimeout. It returns nil when ctx ended it.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stopListening := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopListening()

	hubDone := make(chan struct{})
	go func() {
		defer close(hubDone)
		s.ListenMessager()
	}()
	releaseCtx, stopReleasing := context.WithCancel(ctx)
	releaseDone := make(chan struct{})
	go func() {
		defer close(releaseDone)
		s.releaseMemory(releaseCtx)
	}()

	s.log.Info("listening", "addr", ln.Addr().String())
	err := s.accept(ctx, ln)
	stopReleasing()
	<-releaseDone
	s.log.Info("shutdown", "users", s.conns.Load())
	s.Message <- message{kind: msgShutdown}
	if !waitTimeout(&s.wg, shutdownTimeout) {
		s.log.Warn("shutdown timed out", "users", s.conns.Load())
	}
	s.Message <- message{kind: msgStop}
	<-hubDone
	return err
}

// accept runs the accept loop. It returns nil once ctx is done.
func (s *Server) accept(ctx context.Context, ln net.Listener) error {
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if !outOfResources(err) {
				return err
			}
			// These pass as users leave: wait a little and try again, as
			// net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Error("accept", "err", err, "retry_in", backoff)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if s.maxConns > 0 && s.conns.Load() >= int64(s.maxConns) {
			s.wg.Go(func() { s.reject(conn) })
			continue
		}
		s.conns.Add(1)
		s.stats.accepted.Add(1)
		// The user is made, logged and announced here, and its reader
		// started, so that Handler's goroutine does none of it: see
		// Handler.
		u := newUser(s, conn)
		s.log.Info("connect", "addr", u.Addr)
		s.Online(u)
		u.reader.Go(u.read)
		s.wg.Add(1)
		go s.Handler(u) // not wg.Go, whose frames would cost Handler stack
	}
}

func outOfResources(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

// reject tells a connection the server is full, and closes it.
func (s *Server) reject(conn net.Conn) {
	s.log.Info("reject", "addr", conn.RemoteAddr().String(), "reason", "server full")
	conn.SetDeadline(time.Now().Add(lingerTimeout))
	conn.Write(replyFull)
	// Half-close, and read what the client had already sent: closing with
	// input unread would reset the connection, and a reset can destroy R9
	// before the client reads it.
	closeWrite(conn)
	var buf [512]byte
	for {
		if _, err := conn.Read(buf[:]); err != nil {
			break
		}
	}
	conn.Close()
}

// Handler serves one user, as the course's Handler does: it runs the
// select loop that writes the user's queue when it has something
// (nextBatch, ListenMessage) and kicks the user when no line came for
// s.idle. Once
// the user has left and its queue is written, Handler waits for the
// reader and closes the connection.
//
// Its goroutine waits most of its life and must stay in Go's smallest
// stack, 2 KiB: a stack that grows to 4 KiB never shrinks back (a
// goroutine waiting in a select uses more than the quarter of it that
// allows), which costs 2 KiB more per user (gdb on the runtime's
// goroutines, 2,000 idle users). The write and the deadline, the deepest
// calls, are made one frame below this one, and the accept loop does the
// rest: a log line takes 8 KiB of stack, and any allocation may have to
// help the collector, deep in the runtime.
func (s *Server) Handler(u *User) {
	defer s.wg.Done()
	var kick <-chan time.Time // nil, so never ready, without an idle kick
	if u.idle != nil {
		defer u.idle.Stop()
		kick = u.idle.C
	}
	done := u.done
	for open := true; open; {
		select {
		case <-u.out.wake:
			open = u.nextBatch() && u.ListenMessage()
		case <-kick:
			u.checkIdle()
		case <-done:
			done = nil
			u.offline()
		}
	}
	u.offline() // the writer failed before u left
	u.linger()
	u.reader.Wait()
	u.conn.Close()
}

// Online makes u's name known and announces u to everyone, u first of all.
func (s *Server) Online(u *User) {
	s.mu.Lock()
	s.OnlineMap[u.Name] = u
	s.changedLocked()
	s.mu.Unlock()
	u.inHub.Add(1)
	s.Message <- message{kind: msgJoin, from: u, line: u.userLine([]byte("已上线"))}
}

// Offline takes u out of the room and tells the rest (unless the server
// is stopping).
func (s *Server) Offline(u *User) {
	s.mu.Lock()
	name := u.Name
	if s.OnlineMap[name] == u {
		delete(s.OnlineMap, name)
	}
	s.changedLocked()
	s.mu.Unlock()
	s.conns.Add(-1)
	attrs := []any{"addr", u.Addr, "name", name, "reason", u.reason().String()}
	if u.err != nil && u.reason() != reasonClosed {
		attrs = append(attrs, "err", u.err.Error())
	}
	s.log.Info("disconnect", attrs...)
	line := make([]byte, 0, len(u.Addr)+len(name)+len("[]:已下线\n"))
	line = append(append(append(append(line, '['), u.Addr...), ']'), name...)
	s.Message <- message{kind: msgLeave, to: u, line: append(line, ":已下线\n"...)}
}

// BroadCast sends u's text to everyone, u included, as [addr]name:text.
func (s *Server) BroadCast(u *User, text []byte) {
	u.inHub.Add(1)
	s.Message <- message{kind: msgAll, from: u, line: u.userLine(text)}
}

// sendTo queues line for to: a reply to one of from's commands, or one of
// from's whispers. Whatever from sends must arrive in the order from sent
// it, so while ListenMessager still holds some of from's messages this one
// joins them; otherwise it goes to to's queue at once, which keeps most
// replies and whispers off the hub's one goroutine.
func (s *Server) sendTo(from, to *User, line []byte, whole bool) {
	if from.inHub.Load() > 0 {
		from.inHub.Add(1)
		s.Message <- message{kind: msgTo, from: from, to: to, line: line, whole: whole}
		return
	}
	s.queue(to, line, whole, &from.toWake) // from's reader wakes to's writer
}

// ListenMessager hands out the messages of s.Message one at a time, in
// the order they were queued: that is what gives all users one order of
// broadcasts, and a newcomer its own 已上线 first. It never blocks (a
// queue either takes a line or drops its user) and never logs, so that no
// client, and no stalled stderr, can hold up the room.
//
// It works in rounds: while more messages wait it hands them out too, up
// to roundLines messages or roundDeliveries deliveries, and only then
// wakes the writers it gave lines to. In a burst a writer then wakes once
// for many lines and writes them with one system call; waking it for each
// line cost a write per line per user, and cut fan-out to a fifth of the
// limit server's (compare.sh). When nothing waits, a line's writers are
// woken at once.
func (s *Server) ListenMessager() {
	for m := range s.Message {
		more := s.handOut(m)
		for n := 1; more && n < roundLines && s.round < roundDeliveries && len(s.Message) > 0; n++ {
			more = s.handOut(<-s.Message)
		}
		s.toWake = wakeAll(s.toWake)
		s.round = 0
		if !more {
			return
		}
	}
}

// handOut does what m says. It reports false for msgStop.
func (s *Server) handOut(m message) bool {
	switch m.kind {
	case msgAll:
		s.fanOut(m.line)
	case msgTo:
		s.round++
		s.queue(m.to, m.line, m.whole, &s.toWake)
	case msgJoin: // the accept loop queues every join before the stop
		u := m.from
		u.idx = len(s.members)
		s.members = append(s.members, u)
		s.fanOut(m.line)
		// From now on whispers find u: its 已上线 is queued first.
		u.joined.Store(true)
	case msgLeave:
		s.removeMember(m.to)
		if !s.stopping {
			s.fanOut(m.line)
		}
		m.to.seal(nil)
	case msgShutdown:
		s.stopping = true
		for _, u := range s.members {
			if u.leave(reasonStopping, nil) {
				u.seal(replyStopping)
			}
		}
	case msgStop:
		return false
	}
	if m.from != nil {
		m.from.inHub.Add(-1)
	}
	return true
}

func (s *Server) fanOut(line []byte) {
	// One addition to the shared total for the whole fan-out, not one per
	// user; the users who do not take the line are taken off after.
	s.queued.Add(int64(len(line) * len(s.members)))
	s.round += len(s.members)
	lost := 0
	for _, u := range s.members {
		took, wake := u.push(line, maxQueuedBytes, false)
		if wake {
			s.toWake = append(s.toWake, u)
		}
		if !took {
			lost++
		}
	}
	s.queued.Add(-int64(len(line) * lost))
}

// queue queues line for u alone. If u's writer must be woken, u is added
// to *wake: whoever queues wakes the writers once it has queued all it
// can (ListenMessager at the end of its round, a reader before it waits
// for input), so that a burst costs a writer one wake and one write.
func (s *Server) queue(u *User, line []byte, whole bool, wake *[]*User) {
	s.queued.Add(int64(len(line)))
	took, w := u.push(line, maxQueuedBytes, whole)
	if w {
		*wake = append(*wake, u)
	}
	if !took {
		s.queued.Add(-int64(len(line)))
	}
}

// wakeAll wakes the writers of users, and returns the list emptied.
func wakeAll(users []*User) []*User {
	for _, u := range users {
		u.wakeWriter()
	}
	clear(users)
	return users[:0]
}

func (s *Server) removeMember(u *User) {
	last := len(s.members) - 1
	s.members[u.idx] = s.members[last]
	s.members[u.idx].idx = u.idx
	s.members[last] = nil
	s.members = s.members[:last]
}

// changedLocked notes a change of OnlineMap; s.mu is held.
func (s *Server) changedLocked() {
	s.version++
	s.whoReply = nil
}

// rename gives u the name if no online user holds it: the check and the
// change are one critical section, so of two users racing for a free name
// exactly one wins.
func (s *Server) rename(u *User, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, taken := s.OnlineMap[name]; taken {
		return errNameTaken
	}
	delete(s.OnlineMap, u.Name)
	u.Name = name
	s.OnlineMap[name] = u
	s.changedLocked()
	return nil
}

// lookup returns the online user called name, or nil. A newcomer is found
// only once its 已上线 is queued for it, so that no whisper comes first.
func (s *Server) lookup(name []byte) *User {
	s.mu.Lock()
	u := s.OnlineMap[string(name)]
	s.mu.Unlock()
	if u == nil || !u.joined.Load() {
		return nil
	}
	return u
}

// who returns the who reply: one [addr]name:在线... line per online user,
// sorted by name. It is built once per change of the room and shared by
// every who until the next, so that in a big room a who costs a copy, not
// a sort; the lines are sorted outside the lock.
func (s *Server) who() []byte {
	type entry struct{ name, addr string }
	s.mu.Lock()
	if s.whoReply != nil {
		defer s.mu.Unlock()
		return s.whoReply
	}
	version := s.version
	list := make([]entry, 0, len(s.OnlineMap))
	size := 0
	for name, u := range s.OnlineMap {
		list = append(list, entry{name, u.Addr})
		size += len(name) + len(u.Addr) + len("[]:在线...\n")
	}
	s.mu.Unlock()
	slices.SortFunc(list, func(a, b entry) int { return strings.Compare(a.name, b.name) })
	out := make([]byte, 0, size)
	for _, e := range list {
		out = append(out, '[')
		out = append(out, e.addr...)
		out = append(out, ']')
		out = append(out, e.name...)
		out = append(out, ":在线...\n"...)
	}
	s.mu.Lock()
	if s.version == version {
		s.whoReply = out
	}
	s.mu.Unlock()
	return out
}

// Giving memory back.
const (
	// releaseCheck is how often releaseMemory looks, and releaseAfter how
	// many bytes must have been written to users since the last release
	// for one to be worth its collections.
	releaseCheck = 10 * time.Second
	releaseAfter = 4 << 20
)

// releaseMemory gives memory back to the operating system after a burst
// (a connect storm, a flood of lines). The chunks of users' queues go
// back to their pools once written, and the pools and the runtime keep
// them for reuse for minutes, so a server that had one storm would hold
// its peak long after. Once a whole releaseCheck has passed without a
// line received or a connection accepted, and releaseAfter bytes were
// written since the last release, it collects twice (the first moves the
// pools' chunks to their victim caches, the second frees them) and
// returns the free pages (debug.FreeOSMemory). So it never runs while
// lines flow, and at most once per quiet spell. It returns when ctx is
// done.
func (s *Server) releaseMemory(ctx context.Context) {
	t := time.NewTicker(releaseCheck)
	defer t.Stop()
	var active, released int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if a := s.stats.linesIn.Load() + s.stats.accepted.Load(); a != active {
			active = a
			continue
		}
		if written := s.stats.bytesOut.Load(); written-released >= releaseAfter {
			released = written
			runtime.GC()
			debug.FreeOSMemory()
			s.log.Info("release", "users", s.conns.Load())
		}
	}
}

// waitTimeout waits for wg, at most d; it reports whether wg finished.
func waitTimeout(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}
