package main

import (
	"context"
	"crypto/tls"
	"errors"
	"expvar"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Limits. README names each one where it applies; a client can make the
// server hold or wait for no more than they allow.
const (
	// maxLineBytes is the longest line a client may send, its "\n" and a
	// "\r" before it excluded. A longer line is discarded and answered R7.
	maxLineBytes = 4096
	// maxQueuedBytes bounds the output waiting for one user. A line that
	// would pass it means the user stopped reading: it is dropped at once,
	// so that nobody else ever waits for it.
	maxQueuedBytes = 1 << 20
	// maxQueuedTotal bounds the output waiting for all users together, each
	// line counted once however many users share it. While it is passed,
	// each user's bound is tightQueuedBytes: the users furthest behind go
	// first, and memory stays bounded whatever clients do.
	maxQueuedTotal   = 256 << 20
	tightQueuedBytes = 64 << 10
	// maxNameRunes is the longest name rename| accepts.
	maxNameRunes = 32
	// stallTimeout drops a user whose connection took none of its waiting
	// output for this long: its client or its network is stuck.
	stallTimeout = 2 * time.Minute
	// flushTimeout bounds the last flush to a user who leaves, is kicked,
	// or is told that the server stops; lingerTimeout the read that drains
	// what the client still sends after it, so that the close does not
	// reset the connection and destroy the last lines on their way.
	flushTimeout  = 3 * time.Second
	lingerTimeout = time.Second
	// shutdownTimeout bounds how long Serve waits for its users once it
	// stops: the process must be gone within 5 s of the signal.
	shutdownTimeout = 4 * time.Second
	// Flood control (-rate): a user's budget holds budgetUnits, refilled at
	// the rate. A line costs a unit per started unitBytes as received, at
	// least one; who a unit per started whoUnitUsers online.
	budgetUnits  = 20
	unitBytes    = 512
	whoUnitUsers = 500
	// Connections per address (-max-conns-per-ip N): at most N users at
	// once from one address, and a bucket of 2N new connections refilled
	// at N per addrRefill.
	addrRefill = time.Minute
	// handshakeTimeout bounds a TLS handshake, maxHandshakes how many are
	// in progress at once: past it a new connection is closed at once.
	handshakeTimeout = 10 * time.Second
	maxHandshakes    = 256
	// maxRejecting bounds the connections being turned away at once, each
	// for at most lingerTimeout (beyond its TLS handshake); past it the
	// reply is written and the connection closed at once.
	maxRejecting = 64
	// sendBufferBytes is asked of the kernel for each connection's send
	// buffer (Linux doubles it), so that stuck readers cannot make the
	// kernel hold megabytes each on top of the server's own queue. At 64
	// KiB a who storm's 2,000 non-readers held 271 MiB of it (793 MiB at
	// 256 KiB), and compare.sh's fanout, slowreader and private scenarios
	// showed no cost to fast readers (1.37×, 1.00×, 0.93× the limit server).
	sendBufferBytes = 64 << 10
	// Without flood control, senders wait while a user that reads is more
	// than maxLead behind, maxLeadWait at most: see keepUp.
	maxLead     = 32 << 10
	maxLeadWait = 100 * time.Millisecond
	// messageQueue is the capacity of s.Message. A sender that finds it
	// full waits; ListenMessager never blocks, so the wait is short.
	messageQueue = 1024
)

// The replies of README's "What a line does" (R1–R12 but R3, which carries
// the new name), each a whole line, shared by every user that gets it.
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
	replyAddrFull  = []byte("来自您地址的连接过多，请稍后再试\n")               // R11
	replyBehind    = []byte("对方暂时无法接收，请稍后再试\n")                 // R12
)

// Config holds the server's limits. The zero value of each turns it off.
type Config struct {
	Idle          time.Duration // kick a user after this long without a line
	MaxConns      int           // most users online at once
	MaxConnsPerIP int           // most users online at once from one address, and half its burst of connections
	Rate          float64       // units of flood-control budget a user gets back each second
	TLS           *tls.Config   // if set, clients speak TLS
}

// Server is the chat room: who is online, and the one goroutine that hands
// out every line.
//
// Lock order: s.mu, then a user's u.mu (ListenMessager pushes with neither
// held; rename and who take s.mu alone).
type Server struct {
	Config
	unitEvery time.Duration // a user's budget gets a unit back this often; 0: no flood control
	epoch     time.Time     // the clock of the buckets

	mu        sync.Mutex
	OnlineMap map[string]*User            // by nameKey(name); ListenMessager adds and removes
	whoReply  *line                       // the who reply, if built since the names last changed
	addrs     map[netip.Prefix]*addrUsage // by address, while it has users or its bucket is not full
	sweepAt   int                         // len(addrs) at which to forget the idle ones

	Message chan message  // drained by ListenMessager alone
	hubDone chan struct{} // closed when ListenMessager returns

	conns       atomic.Int64     // users counted against maxConns
	queued      atomic.Int64     // bytes waiting for users, each line once
	rejecting   atomic.Int32     // connections being turned away
	handshaking atomic.Int32     // TLS handshakes in progress
	logTo       slog.Handler     // stderr, usually
	logs        chan slog.Record // see event, writeLog
	logDropped  atomic.Int64     // lines logs could not take
	logEnded    chan struct{}    // closed when writeLog returns
	// What an operator sees (-debug-addr): counters, and the disconnects
	// and rejections by reason.
	vars, left, rejected expvar.Map
	wg                   sync.WaitGroup // Handlers, rejected connections, handshakes

	// ListenMessager's own, but head, which writers read.
	members  []*User      // who gets broadcasts
	tail     *logChunk    // the room's log: where the next broadcast goes
	head     atomic.Int64 // the room's log: its end
	stopping bool         // the stop was handed out: leavers are not announced
}

// NewServer returns a server that logs to log and keeps the limits of cfg.
func NewServer(log *slog.Logger, cfg Config) *Server {
	s := &Server{
		Config:    cfg,
		logTo:     log.Handler(),
		epoch:     time.Now(),
		OnlineMap: make(map[string]*User),
		addrs:     make(map[netip.Prefix]*addrUsage),
		Message:   make(chan message, messageQueue),
		hubDone:   make(chan struct{}),
		logs:      make(chan slog.Record, logQueue),
		logEnded:  make(chan struct{}),
		tail:      &logChunk{b: make([]byte, logChunkBytes)},
	}
	if cfg.Rate > 0 {
		s.unitEvery = time.Duration(float64(time.Second) / cfg.Rate)
	}
	s.vars.Set("users_online", expvar.Func(func() any { return s.conns.Load() }))
	s.vars.Set("bytes_waiting", expvar.Func(func() any { return s.queued.Load() }))
	s.vars.Set("log_lines_dropped", expvar.Func(func() any { return s.logDropped.Load() }))
	s.vars.Set("disconnects", &s.left)
	s.vars.Set("rejects", &s.rejected)
	return s
}

// Serve accepts connections on ln until ctx is done or ln fails, then stops:
// every user gets R10 after what is queued for it, for at most flushTimeout,
// and Serve returns within shutdownTimeout. It returns nil when ctx ended it.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stopListening := context.AfterFunc(ctx, func() { ln.Close() })
	defer stopListening()
	logDone := make(chan struct{})
	go s.writeLog(logDone)
	go s.ListenMessager()

	s.event(slog.LevelInfo, "listening", "addr", ln.Addr().String())
	s.checkDescriptors()
	err := s.accept(ctx, ln)
	s.event(slog.LevelInfo, "shutdown", "users", s.conns.Load())
	s.send(message{kind: msgShutdown})
	left := make(chan struct{})
	go func() { s.wg.Wait(); close(left) }()
	select {
	case <-left:
	case <-time.After(shutdownTimeout):
		s.event(slog.LevelWarn, "shutdown timed out", "users", s.conns.Load())
	}
	s.send(message{kind: msgStop})
	<-s.hubDone
	close(logDone)
	select { // what stderr cannot take by now is left behind
	case <-s.logEnded:
	case <-time.After(500 * time.Millisecond):
	}
	return err
}

// accept runs the accept loop. It returns nil once ctx is done.
func (s *Server) accept(ctx context.Context, ln net.Listener) error {
	// A descriptor kept for the moment there is none left: closed, it lets
	// the connection waiting in the backlog be accepted and told R9,
	// rather than left there unanswered.
	spare, _ := os.Open(os.DevNull)
	defer func() { spare.Close() }()
	for {
		conn, err := ln.Accept()
		switch {
		case err == nil:
		case ctx.Err() != nil:
			return nil
		case (errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)) && spare != nil:
			spare.Close()
			if conn, err := ln.Accept(); err == nil {
				s.turnAway(ctx, conn, replyFull, "no file descriptor left", true)
			}
			spare, _ = os.Open(os.DevNull)
			continue
		case errors.Is(err, syscall.EMFILE), errors.Is(err, syscall.ENFILE), errors.Is(err, syscall.ENOBUFS), errors.Is(err, syscall.ENOMEM):
			// These pass as users leave: wait a little and try again.
			s.rejected.Add("accept failed", 1)
			time.Sleep(10 * time.Millisecond) // then Accept fails at once if ctx is done
			continue
		default:
			return err
		}
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetWriteBuffer(sendBufferBytes)
		}
		key := keyOf(conn.RemoteAddr())
		if s.MaxConns > 0 && s.conns.Load() >= int64(s.MaxConns) {
			s.turnAway(ctx, conn, replyFull, "server full", false)
		} else if why := s.admit(key); why != "" {
			s.turnAway(ctx, conn, replyAddrFull, why, false)
		} else {
			s.conns.Add(1)
			s.vars.Add("connections_accepted", 1)
			if s.TLS != nil {
				conn = tls.Server(conn, s.TLS)
			}
			u := newUser(s, conn, key)
			s.event(slog.LevelInfo, "connect", "addr", u.Addr)
			s.wg.Go(func() { s.Handler(ctx, u) })
		}
	}
}

// Handler serves one user, as the course's Handler does: it runs its TLS
// handshake if there is TLS, brings it in (Online) and starts its reader,
// then runs the select loop that kicks the user when no line came for
// s.Idle, until the user leaves. Then it
// takes the user out (Offline), waits for its last lines to be written
// (at most flushTimeout), lingers, and closes the connection. README's
// "How it works" tells the whole life of a user.
func (s *Server) Handler(ctx context.Context, u *User) {
	if tc, ok := u.conn.(*tls.Conn); ok {
		if err := s.handshake(ctx, tc); err != nil {
			u.leave(reasonHandshake, err) // it never joins: nobody is told
		}
	}
	if !u.gone() {
		s.Online(u)
		select {
		case <-u.joined:
		case <-u.done: // the hub turned it away (R11), or the server stops
		}
	}
	u.reader.Go(u.read)
	idle := time.NewTimer(s.Idle)
	kick := idle.C
	if s.Idle == 0 {
		kick = nil // never ready: nobody is kicked
	}
	for !u.gone() {
		select {
		case <-kick:
			// The reader notes each line's time rather than reset the
			// timer: look at the last line, and kick or wait for the rest.
			if left := s.Idle - time.Since(s.epoch) + time.Duration(u.lastLineAt.Load()); left > 0 {
				idle.Reset(left)
			} else if u.leave(reasonIdle, nil) {
				s.event(slog.LevelInfo, "kick", "addr", u.Addr, "idle", s.Idle)
				u.seal(replyKicked)
			}
		case <-u.done:
		}
	}
	s.Offline(u)
	<-u.flushed
	u.linger()
	u.reader.Wait()
	netConn(u.conn).Close()
	r := *u.why.Load()
	s.left.Add(string(r), 1)
	// The hub took u out: no rename changes u.Name any more.
	attrs := []any{"addr", u.Addr, "name", u.Name, "reason", string(r)}
	if u.err != nil && r != reasonClosed {
		attrs = append(attrs, "err", u.err.Error())
	}
	s.event(slog.LevelInfo, "disconnect", attrs...)
}

// Online asks the hub to bring u into the room: its name becomes known and
// everyone, u first of all, gets its 已上线.
func (s *Server) Online(u *User) {
	s.send(message{kind: msgJoin, from: u, line: u.userLine([]byte("已上线"))})
}

// Offline asks the hub to take u out of the room, for good: the rest get
// its 已下线 (unless the server is stopping), and nothing more is queued
// for u.
func (s *Server) Offline(u *User) {
	s.send(message{kind: msgLeave, from: u})
}

// BroadCast sends u's text to everyone, u included, as [addr]name:text.
func (s *Server) BroadCast(u *User, text []byte) {
	s.send(message{kind: msgAll, from: u, line: u.userLine(text)})
}

// sendTo queues l for to alone: a reply to one of from's commands (to is
// from), or one of from's whispers. Until the hub takes it, it is on its
// way to to (see User.behind).
func (s *Server) sendTo(from, to *User, l *line) {
	to.incoming.Add(int64(len(l.b)))
	s.send(message{kind: msgTo, from: from, to: to, line: l})
}

// send hands m to ListenMessager, unless it has stopped.
func (s *Server) send(m message) {
	select {
	case s.Message <- m:
	case <-s.hubDone:
	}
}

type msgKind uint8

const (
	msgAll      msgKind = iota // from's line goes to every member
	msgTo                      // from's line goes to to alone, unless to is far behind
	msgJoin                    // from becomes a member, then its line goes to every member
	msgLeave                   // from stops being a member, and the rest are told
	msgShutdown                // every member is told the server stops
	msgStop                    // ListenMessager returns
)

// message is what ListenMessager hands out.
type message struct {
	kind msgKind
	from *User // whose message it is; it must be in the room
	to   *User
	line *line
}

// ListenMessager hands out the messages of s.Message one at a time, in the
// order they were queued: all users see one order of lines, and each
// user's replies and whispers keep the order of its lines. It is the one
// authority on who is in the room: a user joins and leaves here, and a
// line from a user that is not in the room goes nowhere. It never blocks
// (a queue takes a line or drops its user).
func (s *Server) ListenMessager() {
	defer close(s.hubDone)
	for m := range s.Message {
		if m.kind == msgStop {
			return
		}
		s.handOut(m)
	}
}

// handOut does what m says.
func (s *Server) handOut(m message) {
	u := m.from
	if m.kind == msgTo {
		m.to.incoming.Add(-int64(len(m.line.b))) // it is on its way no more
	}
	switch {
	case m.kind == msgShutdown:
		s.stopping = true
		for _, u := range s.members {
			u.leave(reasonStopping, nil)
			u.seal(replyStopping)
		}
	case m.kind == msgJoin:
		s.join(u, m.line)
	case m.kind == msgLeave:
		s.part(u)
	case !u.inRoom: // its line goes nowhere
	case m.kind == msgAll:
		s.fanOut(m.line)
	case !m.to.inRoom:
	case m.to != u && m.to.waiting() > tightQueuedBytes:
		s.push(u, &line{b: replyBehind}, s.bound()) // R12: no crowd can drop a reader by whispering
	default:
		s.push(m.to, m.line, s.bound())
	}
}

// join brings u into the room, unless the server stops or u's address is
// a name online already (README's "Users and names": it gets R11).
func (s *Server) join(u *User, online *line) {
	u.lc = s.tail // u's part of the room's log begins here
	u.at.Store(s.head.Load())
	s.mu.Lock()
	key := nameKey(u.Name)
	_, held := s.OnlineMap[key]
	if !held && !s.stopping {
		s.OnlineMap[key] = u
		s.whoReply = nil // the names changed
	}
	s.mu.Unlock()
	switch {
	case s.stopping:
		u.leave(reasonStopping, nil)
		u.seal(replyStopping)
	case held:
		u.leave(reasonAddrHeld, nil)
		u.seal(replyAddrFull)
	default:
		u.inRoom = true
		s.members = append(s.members, u)
		s.fanOut(online) // u's 已上线 is its first line
		close(u.joined)
	}
}

// part takes u out of the room for good and frees its slot.
func (s *Server) part(u *User) {
	if u.lc == nil { // it never joined: nothing of the room's log is for it
		u.lc = s.tail
		u.at.Store(s.head.Load())
	}
	s.mu.Lock()
	if key := nameKey(u.Name); s.OnlineMap[key] == u {
		delete(s.OnlineMap, key)
		s.whoReply = nil // the names changed
	}
	s.releaseLocked(u.key)
	s.mu.Unlock() // no rename changes u.Name any more
	u.seal(nil)   // before its 已下线, which is not for u
	if u.inRoom {
		u.inRoom = false
		s.members = slices.DeleteFunc(s.members, func(m *User) bool { return m == u })
		if !s.stopping {
			s.fanOut(&line{b: []byte("[" + u.Addr + "]" + u.Name + ":已下线\n")})
		}
	}
}

// fanOut appends l to the room's log, for every member: a member that is
// now more than its bound behind has stopped reading, and is dropped.
func (s *Server) fanOut(l *line) {
	s.appendLog(l.b)
	bound := s.bound()
	for _, u := range s.members {
		if w := u.waiting(); w > bound {
			s.drop(u)
		} else if w > 0 {
			u.wake()
		}
	}
	s.keepUp(s.members...)
}

// keepUp waits, without flood control (-rate 0), until none of users is
// behind (see User.behind), maxLeadWait at most. Nothing else then holds
// back a sender that outruns its readers, which would fall behind and be
// dropped, or see whispers refused (R12): so the senders wait instead,
// slowed down by TCP. A user that stopped reading holds nobody up.
func (s *Server) keepUp(users ...*User) {
	// Without it, the side-by-side harness's fanout, slowreader and private
	// scenarios (OURS_ARGS="-idle 0 -rate 0 -max-conns-per-ip 0") dropped
	// readers or refused whispers; TestSendersWaitWithoutFloodControl.
	if s.unitEvery != 0 {
		return
	}
	deadline, now := time.After(maxLeadWait), time.Now().UnixNano()
	for _, u := range users {
		if began := u.writeBegan.Load(); began != 0 && now-began >= int64(maxLeadWait) {
			continue // a write of its has waited that long: it does not read
		}
		if ch := u.behind(); ch != nil {
			select {
			case <-ch:
			case <-deadline:
				return
			}
		}
	}
}

// push queues l for u alone without ever blocking. A user whose queue l
// would take past its bound has stopped reading, and is dropped; a who
// reply is taken whole if less than 1 MiB waited before it (README's
// "Events"), while the total is under its bound.
func (s *Server) push(u *User, l *line, bound int) {
	u.mu.Lock()
	switch waiting := u.waiting(); {
	case u.sealed:
	case waiting+len(l.b) > bound && !(l.whole && bound == maxQueuedBytes && waiting < bound):
		u.mu.Unlock()
		s.drop(u)
		return
	default:
		u.queueLocked(l)
	}
	u.mu.Unlock()
	u.wake()
}

func (s *Server) drop(u *User) {
	u.mu.Lock()
	u.leave(reasonSlowReader, nil)
	u.abortLocked()
	u.mu.Unlock()
}

// bound is how many bytes may wait for one user now.
func (s *Server) bound() int {
	if s.queued.Load() > maxQueuedTotal {
		return tightQueuedBytes
	}
	return maxQueuedBytes
}

// The room's bookkeeping: names and who.

var errNameTaken = errors.New("name taken")

// rename gives u the name if no online user holds it or one that looks
// like it (nameKey): the check and the change are one critical section,
// so of two users racing for a free name exactly one wins. A user that is
// no longer in the room keeps its name (and gets no reply).
func (s *Server) rename(u *User, name string) error {
	key, old := nameKey(name), nameKey(u.Name)
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.OnlineMap[old] != u:
		return errGone
	case s.OnlineMap[key] != nil:
		return errNameTaken
	}
	delete(s.OnlineMap, old)
	u.Name = name
	s.OnlineMap[key] = u
	s.whoReply = nil // the names changed
	return nil
}

var errGone = errors.New("left the room")

// lookup returns the online user whose name is name as names compare
// (nameKey), or nil.
func (s *Server) lookup(name []byte) *User {
	key := nameKey(string(name))
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.OnlineMap[key]
}

// who returns the who reply: one [addr]name:在线... line per online user,
// sorted by name. It is shared by every who until the room changes: a who
// storm costs its bytes once.
func (s *Server) who() *line {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.whoReply == nil {
		var b []byte
		for _, u := range slices.SortedFunc(maps.Values(s.OnlineMap), func(a, b *User) int { return strings.Compare(a.Name, b.Name) }) {
			b = append(append(append(append(append(b, '['), u.Addr...), ']'), u.Name...), ":在线...\n"...)
		}
		s.whoReply = &line{b: b, whole: true}
	}
	return s.whoReply
}

// cost is what a line costs in flood-control units: see budgetUnits.
func (s *Server) cost(kind cmdKind, size int) int {
	if kind == cmdWho {
		return max(1, (int(s.conns.Load())+whoUnitUsers-1)/whoUnitUsers)
	}
	return max(1, (size+unitBytes-1)/unitBytes)
}

// Fair use: admission, buckets, turning away.

// checkDescriptors warns when -max-conns users could need more file
// descriptors than the process may open: the users past the limit get R9.
func (s *Server) checkDescriptors() {
	var lim syscall.Rlimit
	if s.MaxConns == 0 || syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) != nil {
		return
	}
	// Besides its users: stdin, stdout, stderr, the listener, the poller
	// and its wakeup, the spare, the connections being turned away.
	if need := uint64(s.MaxConns) + 7 + maxRejecting; need > lim.Cur {
		s.event(slog.LevelWarn, "file descriptor limit below -max-conns", "limit", lim.Cur, "need", need, "hint", "raise it (ulimit -n, LimitNOFILE=) or lower -max-conns")
	}
}

// turnAway tells a connection why it is turned away (R9, R11) and closes
// it: over TLS after the handshake. It half-closes, and reads what the
// client had sent, for at most lingerTimeout: closing with input unread
// would reset the connection, and a reset can destroy the reply before
// the client reads it. At most maxRejecting connections are held at once;
// past that, or when now is set, the reply is written and the connection
// closed at once (a TLS one closed with nothing said).
func (s *Server) turnAway(ctx context.Context, conn net.Conn, reply []byte, why string, now bool) {
	s.rejected.Add(why, 1) // logged by writeLog
	// accept, the only goroutine that adds to s.rejecting, calls turnAway.
	if now || s.rejecting.Load() >= maxRejecting {
		if s.TLS == nil {
			// A fresh connection's send buffer is empty: this write does
			// not wait (the deadline is for connections that are not TCP's).
			conn.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
			conn.Write(reply)
		}
		conn.Close()
		return
	}
	s.rejecting.Add(1)
	s.wg.Go(func() {
		defer s.rejecting.Add(-1)
		defer conn.Close()
		if s.TLS != nil {
			tc := tls.Server(conn, s.TLS)
			if s.handshake(ctx, tc) != nil {
				return
			}
			conn = tc
		}
		conn.SetDeadline(time.Now().Add(lingerTimeout))
		if _, err := conn.Write(reply); err == nil {
			closeWrite(conn)
			for buf := make([]byte, 512); err == nil; {
				_, err = conn.Read(buf)
			}
		}
	})
}

// handshake runs a TLS handshake, for at most handshakeTimeout, or until
// ctx is done; while maxHandshakes are in progress it fails at once.
// Deadlines end it, not HandshakeContext: on a context's end crypto/tls
// closes the connection itself, before its slot is freed.
func (s *Server) handshake(ctx context.Context, tc *tls.Conn) error {
	defer s.handshaking.Add(-1)
	if s.handshaking.Add(1) > maxHandshakes {
		return errors.New("too many handshakes in progress")
	}
	tc.SetDeadline(time.Now().Add(handshakeTimeout))
	defer context.AfterFunc(ctx, func() { tc.SetDeadline(aLongTimeAgo) })()
	err := tc.Handshake()
	tc.SetDeadline(time.Time{})
	return err
}

// releaseLocked frees the slot of a connection that leaves, in -max-conns
// and in its address's users; s.mu is held.
func (s *Server) releaseLocked(key netip.Prefix) {
	s.conns.Add(-1)
	if a := s.addrs[key]; a != nil {
		a.users--
	}
}

// addrUsage is what one address holds: its users, and its bucket of new
// connections.
type addrUsage struct {
	users   int
	arrival bucket
}

// keyOf is the address a connection counts against: its IPv4 address, or
// its IPv6 /64 (what one subscriber is usually given).
func keyOf(a net.Addr) netip.Prefix {
	ta, _ := a.(*net.TCPAddr) // nil, and no address, for a net.Pipe
	ip := ta.AddrPort().Addr().Unmap()
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}

// admit counts a new connection against its address: it may have at most
// maxPerIP users at once, and its bucket must have a connection left. It
// returns why the connection is turned away, or "".
func (s *Server) admit(key netip.Prefix) string {
	if s.MaxConnsPerIP == 0 {
		return ""
	}
	now := time.Since(s.epoch)
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.addrs[key]
	if a == nil {
		if len(s.addrs) >= s.sweepAt {
			// Forget the addresses that have no user and a full bucket, as
			// if they had never come; at most once per doubling of the map.
			for key, a := range s.addrs {
				if a.users == 0 && a.arrival.full <= now {
					delete(s.addrs, key)
				}
			}
			s.sweepAt = max(64, 2*len(s.addrs))
		}
		a = &addrUsage{}
		s.addrs[key] = a
	}
	switch {
	case a.users >= s.MaxConnsPerIP:
		return "too many users from the address"
	case !a.arrival.take(now, 1, addrRefill/time.Duration(s.MaxConnsPerIP), 2*s.MaxConnsPerIP):
		return "too many connections from the address"
	}
	a.users++
	return ""
}

// bucket is a budget of at most burst units, refilled at one unit per
// every (the generic cell rate algorithm: full is when it would be full
// again, had nothing more been taken). Times are since the server's epoch.
type bucket struct{ full time.Duration }

// reserve takes cost units, and says how long to wait until the budget
// holds them (0: at once).
func (b *bucket) reserve(now time.Duration, cost int, every time.Duration, burst int) time.Duration {
	b.full = max(b.full, now) + time.Duration(cost)*every
	return max(b.full-now-time.Duration(burst)*every, 0)
}

// take takes cost units if the budget holds them now.
func (b *bucket) take(now time.Duration, cost int, every time.Duration, burst int) bool {
	if max(b.full, now)+time.Duration(cost)*every-now > time.Duration(burst)*every {
		return false
	}
	b.reserve(now, cost, every, burst)
	return true
}

// The log.

const (
	logQueue = 1024 // lines waiting for stderr; past it they are dropped, and counted
	logBurst = 5    // lines of one kind of event a second; past it, a count a second
)

// event logs msg with its attributes (key, value pairs). It never waits:
// writeLog writes the line, and a stalled stderr holds up nothing.
func (s *Server) event(level slog.Level, msg string, attrs ...any) {
	select {
	case s.logs <- record(level, msg, attrs...):
	default:
		s.logDropped.Add(1)
	}
}

func record(level slog.Level, msg string, attrs ...any) slog.Record {
	r := slog.NewRecord(time.Now(), level, msg, 0)
	r.Add(attrs...)
	return r
}

// writeLog writes the lines of s.logs to s.logTo until done is closed and
// they are written. Of each kind of event it writes logBurst lines a second
// at most, and the count of the rest once the second is over; rejections,
// once a second for each reason, with their count (README's "Operating it").
func (s *Server) writeLog(done <-chan struct{}) {
	defer close(s.logEnded)
	counts := map[string]int{}     // lines of each kind in this second
	rejected := map[string]int64{} // rejections logged, by reason
	second := time.NewTicker(time.Second)
	defer second.Stop()
	for ended := false; !ended; {
		select {
		case r := <-s.logs:
			if counts[r.Message]++; counts[r.Message] <= logBurst {
				s.writeRecord(r)
			}
			continue
		case <-second.C:
		case <-done:
			if ended = len(s.logs) == 0; !ended {
				continue // the lines still queued first
			}
		}
		for msg, n := range counts {
			if n > logBurst {
				s.writeRecord(record(slog.LevelInfo, msg, "more", n-logBurst))
			}
		}
		clear(counts)
		s.rejected.Do(func(kv expvar.KeyValue) {
			if n := kv.Value.(*expvar.Int).Value(); n > rejected[kv.Key] {
				s.writeRecord(record(slog.LevelInfo, "reject", "reason", kv.Key, "count", n-rejected[kv.Key]))
				rejected[kv.Key] = n
			}
		})
	}
}

// writeRecord writes r, after the count of the lines dropped since the
// last line written, if any.
func (s *Server) writeRecord(r slog.Record) {
	if n := s.logDropped.Swap(0); n > 0 {
		s.logTo.Handle(context.Background(), record(slog.LevelWarn, "log lines dropped", "count", n))
	}
	s.logTo.Handle(context.Background(), r)
}
