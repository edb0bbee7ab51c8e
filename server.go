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
	// flushTimeout bounds the last flush to a user who is leaving, is
	// kicked, or is told that the server stops.
	flushTimeout = 3 * time.Second
	// shutdownTimeout bounds how long Serve waits for its connections once
	// it stops: the process must be gone within 5 s of the signal.
	shutdownTimeout = 4 * time.Second
	// rejectLinger bounds the time spent on a connection turned away with R9.
	rejectLinger = time.Second
	// messageQueue is the capacity of the broadcast channel. A reader that
	// finds it full waits; ListenMessager never blocks, so the wait lasts
	// only as long as the lines ahead of it take to hand out.
	messageQueue = 1024
	// wakeRound and roundLines bound a round of ListenMessager: the
	// deliveries (a few milliseconds of work) and the messages it hands out
	// while more wait, before it wakes the writers it gave lines to.
	wakeRound  = 1 << 17
	roundLines = 64
	// releaseCheck is how often the server looks for the end of a burst,
	// and releaseAfter how many bytes a burst must have handed out before
	// the memory it took is worth giving back to the operating system.
	releaseCheck = 250 * time.Millisecond
	releaseAfter = 4 << 20
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

// Server is the chat room: who is online, and the one goroutine that hands
// every line to its recipients.
type Server struct {
	log      *slog.Logger
	idle     time.Duration // kick after this long without a line; 0: never
	maxConns int           // 0: no limit
	epoch    time.Time     // User.lastLine counts from here

	mu        sync.Mutex
	OnlineMap map[string]*User // by name

	conns   atomic.Int64 // connections counted against maxConns
	message chan message // drained by ListenMessager alone
	wg      sync.WaitGroup

	// Owned by ListenMessager.
	members  []*User // who gets broadcasts
	stopping bool    // the server stops: newcomers are told so, leavers are not announced
	toWake   []*User // writers to wake at the end of this round
	round    int     // deliveries made in this round
	handed   int     // bytes handed out since memory was last released
	busy     bool    // a line was handed out since the last msgQuiet
}

// NewServer returns a server that logs to log, kicks users idle for idle
// (0: never) and holds at most maxConns users (0: no limit).
func NewServer(log *slog.Logger, idle time.Duration, maxConns int) *Server {
	return &Server{
		log:       log,
		idle:      idle,
		maxConns:  maxConns,
		epoch:     time.Now(),
		OnlineMap: make(map[string]*User),
		message:   make(chan message, messageQueue),
	}
}

type msgKind uint8

const (
	msgAll      msgKind = iota // line goes to every member
	msgTo                      // line goes to user alone
	msgJoin                    // user becomes a member, then line goes to every member
	msgLeave                   // user stops being a member, then line goes to the rest
	msgShutdown                // every member, and every later newcomer, is told the server stops
	msgQuiet                   // reply says whether a burst has just ended
	msgStop                    // ListenMessager returns
)

// message is one line for ListenMessager to hand out. Every line a user
// receives passes through it, replies and whispers too, so whatever one
// reader does reaches everyone in the order it was done.
type message struct {
	kind  msgKind
	user  *User
	line  []byte
	buf   *buffer     // line's pooled storage, freed once handed out; nil for a constant line
	reply chan<- bool // msgQuiet's answer
}

// Serve accepts connections on ln until ctx is done or ln fails, then stops:
// every user gets R10 after what is queued for it, for at most flushTimeout,
// and Serve returns within shutdownTimeout. It returns nil when ctx ended it.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stopListening := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopListening()

	listenerDone := make(chan struct{})
	go func() {
		defer close(listenerDone)
		s.ListenMessager()
	}()
	releaseCtx, stopReleasing := context.WithCancel(ctx)
	releaseDone := make(chan struct{})
	go func() {
		defer close(releaseDone)
		s.releaseAfterBursts(releaseCtx)
	}()

	s.log.Info("listening", "addr", ln.Addr().String())
	err := s.accept(ctx, ln)
	stopReleasing()
	<-releaseDone
	s.log.Info("shutdown", "users", s.conns.Load())
	s.message <- message{kind: msgShutdown}
	if !waitTimeout(&s.wg, shutdownTimeout) {
		s.log.Warn("shutdown timed out", "users", s.conns.Load())
	}
	s.message <- message{kind: msgStop}
	<-listenerDone
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
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors, or a connection reset before it was
			// accepted: wait a little and go on, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Error("accept", "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if n := s.conns.Add(1); s.maxConns > 0 && n > int64(s.maxConns) {
			s.conns.Add(-1)
			s.wg.Go(func() { s.reject(conn) })
			continue
		}
		// Everything here (the log line, the idle timer, the join) runs on
		// this one goroutine's stack rather than on u's two, which then
		// stay small. Joining here also lets a connect storm queue its
		// joins as fast as they are accepted, so that ListenMessager hands
		// them out in rounds: a new user's reader would first wait its turn
		// behind every writer the last join woke.
		u := newUser(s, conn)
		s.log.Info("connect", "addr", u.Addr)
		s.Online(u)
		s.wg.Go(u.serve)
		s.wg.Go(u.ListenMessage)
	}
}

// reject tells a connection the server is full, and closes it.
func (s *Server) reject(conn net.Conn) {
	s.log.Info("reject", "addr", conn.RemoteAddr().String(), "reason", "server full")
	conn.SetDeadline(time.Now().Add(rejectLinger))
	conn.Write(replyFull)
	// Close our side first and read what the client had already sent:
	// closing with input unread would reset the connection, and a reset
	// can destroy R9 before the client reads it.
	if cw, ok := conn.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
		var buf [512]byte
		discard(conn, buf[:])
	}
	conn.Close()
}

// Online announces u to everyone, u first of all, and makes its name known.
func (s *Server) Online(u *User) {
	// The join goes into the queue before the name is in OnlineMap: a
	// whisper to u can only be queued after the name is found, so it can
	// never reach u before its own 已上线.
	buf := lineBufs.get()
	buf.b = appendUserLine(buf.b, u, "已上线")
	s.message <- message{kind: msgJoin, user: u, line: buf.b, buf: buf}
	s.mu.Lock()
	s.OnlineMap[u.Name] = u
	s.mu.Unlock()
}

// Offline removes u from the room and tells the rest (unless the server is
// stopping).
func (s *Server) Offline(u *User, reason string) {
	s.mu.Lock()
	if s.OnlineMap[u.Name] == u {
		delete(s.OnlineMap, u.Name)
	}
	s.mu.Unlock()
	s.conns.Add(-1)
	s.log.Info("disconnect", "addr", u.Addr, "name", u.Name, "reason", reason)
	buf := lineBufs.get()
	buf.b = appendUserLine(buf.b, u, "已下线")
	s.message <- message{kind: msgLeave, user: u, line: buf.b, buf: buf}
}

// BroadCast sends u's text to everyone, u included, as [addr]name:text.
func (s *Server) BroadCast(u *User, text []byte) {
	buf := lineBufs.get()
	buf.b = append(appendUserPrefix(buf.b, u), text...)
	buf.b = append(buf.b, '\n')
	s.message <- message{kind: msgAll, line: buf.b, buf: buf}
}

// sendTo queues line for u alone, in the same order as every other line.
func (s *Server) sendTo(u *User, line []byte, buf *buffer) {
	s.message <- message{kind: msgTo, user: u, line: line, buf: buf}
}

// ListenMessager hands every queued line to its recipients. It is the only
// goroutine that does, which is what gives all users one order of lines,
// and it never blocks: a user's queue either takes the line or drops the user.
//
// It works in rounds: while more messages wait it hands them out too, up
// to roundLines messages or wakeRound deliveries, and only then wakes the
// writers it gave lines to. In a burst (a connect storm, a flood of
// lines) a writer then wakes once for many lines and writes them at once,
// where waking it for each line would cost a write, and the client a read,
// per line. When nothing waits, a line's writers are woken at once.
func (s *Server) ListenMessager() {
	for m := range s.message {
		more := s.handOut(m)
		for n := 1; more && n < roundLines && s.round < wakeRound && len(s.message) > 0; n++ {
			more = s.handOut(<-s.message)
		}
		s.wakeWriters()
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
		s.push(m.user, m.line)
	case msgJoin:
		m.user.idx = len(s.members)
		s.members = append(s.members, m.user)
		if s.stopping {
			m.user.stop()
		} else {
			s.fanOut(m.line)
		}
	case msgLeave:
		s.removeMember(m.user)
		if !s.stopping {
			s.fanOut(m.line)
		}
		m.user.finish(nil)
	case msgShutdown:
		s.stopping = true
		for _, u := range s.members {
			u.stop()
		}
	case msgQuiet:
		ended := !s.busy && s.handed >= releaseAfter && s.drained()
		if ended {
			s.handed = 0
		}
		s.busy = false
		m.reply <- ended
		return true
	case msgStop:
		return false
	}
	s.busy = true
	if m.buf != nil {
		lineBufs.put(m.buf)
	}
	return true
}

func (s *Server) fanOut(line []byte) {
	for _, u := range s.members {
		s.push(u, line)
	}
}

// push queues line for u, and notes u's writer for waking at the end of the
// round if it may be asleep.
func (s *Server) push(u *User, line []byte) {
	s.round++
	s.handed += len(line)
	if u.push(line) {
		s.toWake = append(s.toWake, u)
	}
}

// wakeWriters ends a round: it wakes the writers given lines in it.
func (s *Server) wakeWriters() {
	for _, u := range s.toWake {
		u.out.signal()
	}
	clear(s.toWake)
	s.toWake = s.toWake[:0]
	s.round = 0
}

// drained reports whether every member's queue has been written.
func (s *Server) drained() bool {
	for _, u := range s.members {
		if !u.out.empty() {
			return false
		}
	}
	return true
}

// releaseAfterBursts gives memory back to the operating system once a
// burst is over, until ctx is done. A burst fills users' queues with
// chunks, which go back to their pools once written; the runtime keeps
// that memory for reuse for minutes unless asked, so a server that had one
// connect storm would hold its peak for a long while. A burst is over when
// a whole releaseCheck passed without a line and every queue is written.
func (s *Server) releaseAfterBursts(ctx context.Context) {
	t := time.NewTicker(releaseCheck)
	defer t.Stop()
	reply := make(chan bool, 1)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		select {
		case s.message <- message{kind: msgQuiet, reply: reply}:
		case <-ctx.Done():
			return
		}
		if !<-reply {
			continue
		}
		// The first collection moves the pools' chunks to their victim
		// caches; the second frees them, and returns what is free.
		runtime.GC()
		debug.FreeOSMemory()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		s.log.Info("release", "heap_bytes", ms.HeapAlloc, "stack_bytes", ms.StackInuse)
	}
}

func (s *Server) removeMember(u *User) {
	last := len(s.members) - 1
	s.members[u.idx] = s.members[last]
	s.members[u.idx].idx = u.idx
	s.members[last] = nil
	s.members = s.members[:last]
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
	return nil
}

// lookup returns the online user called name, or nil.
func (s *Server) lookup(name []byte) *User {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.OnlineMap[string(name)]
}

// who lists the online users sorted by name, one [addr]name:在线... line each.
func (s *Server) who() []byte {
	type entry struct{ name, addr string }
	s.mu.Lock()
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
	return out
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

// buffer is a pooled byte slice; the pointer keeps Put free of allocation.
type buffer struct{ b []byte }

// bufferPool recycles buffers of one use; it drops those that grew past
// max, so that one burst does not pin memory for ever.
type bufferPool struct {
	pool      sync.Pool
	size, max int
}

// lineBufs holds the formatted lines on their way to ListenMessager.
var lineBufs = &bufferPool{size: 256, max: 16 << 10}

func (p *bufferPool) get() *buffer {
	if b, ok := p.pool.Get().(*buffer); ok {
		return b
	}
	return &buffer{b: make([]byte, 0, p.size)}
}

func (p *bufferPool) put(b *buffer) {
	if cap(b.b) > p.max {
		return
	}
	b.b = b.b[:0]
	p.pool.Put(b)
}
