package main

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
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
	// maxQueuedTotal bounds the output waiting for all users together:
	// while it is passed, each user's bound is tightQueuedBytes, so that
	// those furthest behind go first and the server's memory stays bounded
	// whatever its clients do.
	maxQueuedTotal   = 256 << 20
	tightQueuedBytes = 64 << 10
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
	// Flood control (-rate): a user's budget holds budgetUnits, refilled
	// at the rate. A line costs a unit per started unitBytes as received,
	// at least one; who a unit per started whoUnitUsers online; an
	// over-long line tooLongUnits. A line the budget cannot pay for waits,
	// and nothing more is read from its user meanwhile.
	budgetUnits  = 20
	unitBytes    = 512
	whoUnitUsers = 500
	tooLongUnits = 8
	// Connections per address (-max-conns-per-ip N): at most N users at
	// once from one address (IPv4, or IPv6 /64), and a bucket of 2N new
	// connections refilled at N per addrRefill.
	addrRefill = time.Minute
	// handshakeTimeout bounds a TLS connection's handshake: one that has
	// not finished it by then is closed.
	handshakeTimeout = 10 * time.Second
	// maxRejecting bounds the connections being turned away at once, each
	// for at most lingerTimeout; past it, the reply is written and the
	// connection closed at once.
	maxRejecting = 64
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
	replyAddrFull  = []byte("来自您地址的连接过多，请稍后再试\n")               // R11
)

var errNameTaken = errors.New("name taken")

// Config holds the server's limits. The zero value of each turns it off.
type Config struct {
	Idle          time.Duration // kick a user after this long without a line
	MaxConns      int           // most users online at once
	MaxConnsPerIP int           // most users online at once from one address, and half its burst of connections
	Rate          float64       // units of flood-control budget a user gets back each second
	TLS           *tls.Config   // if set, clients speak TLS
}

// Server is the chat room: who is online, and the one goroutine that hands
// out every broadcast.
//
// Lock order: s.mu and a user's out.mu are never held together.
type Server struct {
	log       *slog.Logger
	idle      time.Duration
	maxConns  int
	maxPerIP  int
	unitEvery time.Duration // a user's budget gets a unit back this often; 0: no flood control
	tls       *tls.Config
	epoch     time.Time // User.lastLineAt counts from here

	mu        sync.Mutex
	OnlineMap map[string]*User            // by name
	sorted    []*User                     // OnlineMap's users, by name, for who
	taken     map[string]*User            // by foldName(name): no two names fold alike
	addrs     map[netip.Prefix]*addrUsage // by address, while it has users or its bucket is not full
	sweepAt   int                         // len(addrs) at which to drop those that need not stay
	version   int                         // counts changes of OnlineMap
	whoReply  []byte                      // built for version, nil after a change

	Message    chan message // drained by ListenMessager alone
	conns      atomic.Int64 // users counted against maxConns
	queued     atomic.Int64 // bytes waiting in all users' queues
	rejecting  atomic.Int32 // connections being turned away
	rejects    rejectLog
	stats      stats
	wg         sync.WaitGroup // users' Handlers, rejected connections
	handshakes sync.WaitGroup

	// ListenMessager's own.
	members  []*User // who gets broadcasts
	stopping bool    // the stop was handed out: leavers are not announced
	toWake   []*User // writers to wake at the end of the round
	round    int     // deliveries made in the round
}

// NewServer returns a server that logs to log and keeps the limits of cfg.
func NewServer(log *slog.Logger, cfg Config) *Server {
	s := &Server{
		log:       log,
		idle:      cfg.Idle,
		maxConns:  cfg.MaxConns,
		maxPerIP:  cfg.MaxConnsPerIP,
		tls:       cfg.TLS,
		epoch:     time.Now(),
		OnlineMap: make(map[string]*User),
		taken:     make(map[string]*User),
		addrs:     make(map[netip.Prefix]*addrUsage),
		Message:   make(chan message, messageQueue),
	}
	if cfg.Rate > 0 {
		s.unitEvery = time.Duration(float64(time.Second) / cfg.Rate)
	}
	s.rejects.log = log
	s.rejects.total = &s.stats.rejected
	return s
}

// stats counts what the server did: for its operator (Stats), and for
// releaseMemory, which looks for a quiet spell.
type stats struct {
	accepted         atomic.Int64 // connections that became users
	linesIn          atomic.Int64 // complete lines received
	linesOut         atomic.Int64 // lines written to users
	bytesOut         atomic.Int64 // bytes written to users
	waited           atomic.Int64 // lines that waited for flood control
	handshakesFailed atomic.Int64 // TLS connections closed before they became users
	left             [reasons]atomic.Int64
	rejected         [rejectReasons]atomic.Int64
}

// Stats is what the server counts, for its operator (-debug-addr, expvar).
// Each is an atomic counter the hot paths add to; this reads them.
func (s *Server) Stats() map[string]any {
	left := map[string]int64{}
	for r := range reasons {
		if r != online {
			left[r.String()] = s.stats.left[r].Load()
		}
	}
	rejected := map[string]int64{}
	for r := range rejectReasons {
		if r != admitted {
			rejected[rejectText[r]] = s.stats.rejected[r].Load()
		}
	}
	return map[string]any{
		"users_online":          s.conns.Load(),
		"connections_accepted":  s.stats.accepted.Load(),
		"lines_received":        s.stats.linesIn.Load(),
		"lines_sent":            s.stats.linesOut.Load(),
		"bytes_sent":            s.stats.bytesOut.Load(),
		"bytes_waiting":         s.queued.Load(),
		"lines_waited":          s.stats.waited.Load(),
		"kicks":                 s.stats.left[reasonIdle].Load(),
		"disconnects":           left,
		"rejects":               rejected,
		"tls_handshakes_failed": s.stats.handshakesFailed.Load(),
	}
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
	s.checkDescriptors()
	err := s.accept(ctx, ln)
	s.handshakes.Wait() // they end with ctx: every join is queued before the stop
	s.rejects.flush()   // later ones are logged as they come
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
	// A descriptor kept for the moment there is none left: closed, it lets
	// the connection waiting in the backlog be accepted and told R9,
	// rather than left there unanswered.
	spare, _ := os.Open(os.DevNull)
	defer func() { spare.Close() }()
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
			if spare != nil && outOfDescriptors(err) {
				spare.Close()
				if conn, err := ln.Accept(); err == nil {
					s.turnAway(conn, replyFull, rejectNoDescriptors, true)
				}
				spare, _ = os.Open(os.DevNull)
				continue
			}
			// These pass as users leave: wait a little and try again, as
			// net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.rejects.note(rejectAcceptFailed)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		if s.maxConns > 0 && s.conns.Load() >= int64(s.maxConns) {
			s.turnAway(conn, replyFull, rejectFull, false)
			continue
		}
		key := keyOf(conn.RemoteAddr())
		if why := s.admit(key); why != admitted {
			s.turnAway(conn, replyAddrFull, why, false)
			continue
		}
		s.conns.Add(1)
		if s.tls != nil {
			s.handshakes.Go(func() { s.handshake(ctx, conn, key) })
			continue
		}
		s.welcome(conn, key)
	}
}

// welcome makes the connection a user: it logs it, announces it, and
// starts its reader and its Handler. The accept loop does it (or, for
// TLS, the handshake's goroutine) so that Handler's goroutine does none
// of it: see Handler.
func (s *Server) welcome(conn net.Conn, key netip.Prefix) {
	s.stats.accepted.Add(1)
	u := newUser(s, conn)
	u.addrKey = key
	s.log.Info("connect", "addr", u.Addr)
	s.Online(u)
	u.reader.Go(u.read)
	s.wg.Add(1)
	go s.Handler(u) // not wg.Go, whose frames would cost Handler stack
}

// handshake runs a TLS connection's handshake, off the accept loop and
// after the connection was counted against the limits, for at most
// handshakeTimeout. A connection that does not finish it in time, or
// fails it, is closed with nothing said (there is no TLS to say it in),
// and logged.
func (s *Server) handshake(ctx context.Context, raw net.Conn, key netip.Prefix) {
	conn := tls.Server(raw, s.tls)
	// The deadline, not a context's timeout, bounds it: on a context's end
	// crypto/tls closes the connection itself, before the slot is freed.
	raw.SetDeadline(time.Now().Add(handshakeTimeout))
	err := conn.HandshakeContext(ctx)
	if err == nil && ctx.Err() == nil { // no join once the server stops
		raw.SetDeadline(time.Time{})
		s.welcome(conn, key)
		return
	}
	if err == nil {
		err = ctx.Err()
	}
	// The slot is freed and counted before the close, as a user's is:
	// whoever sees the close may take the slot at once.
	s.mu.Lock()
	s.releaseLocked(key)
	s.mu.Unlock()
	s.stats.handshakesFailed.Add(1)
	s.log.Info("tls handshake failed", "addr", raw.RemoteAddr().String(), "err", err.Error())
	raw.Close()
}

// checkDescriptors warns when -max-conns users could need more file
// descriptors than the process may open: the users past the limit get
// R9, not a slot.
func (s *Server) checkDescriptors() {
	var lim syscall.Rlimit
	if s.maxConns == 0 || syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) != nil {
		return
	}
	// Besides its users: stdin, stdout, stderr, the listener, the poller
	// and its wakeup, the spare, the connections being turned away.
	if need := uint64(s.maxConns) + 7 + maxRejecting; need > lim.Cur {
		s.log.Warn("file descriptor limit below -max-conns", "limit", lim.Cur, "need", need,
			"hint", "raise it (ulimit -n, LimitNOFILE=) or lower -max-conns")
	}
}

func outOfResources(err error) bool {
	return outOfDescriptors(err) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM)
}

func outOfDescriptors(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// turnAway tells a connection why it is turned away (R9, R11) and closes
// it. It half-closes, and reads what the client had already sent, for at
// most lingerTimeout: closing with input unread would reset the
// connection, and a reset can destroy the reply before the client reads
// it. At most maxRejecting connections linger at once; past that, or
// when now is set, the reply is written and the connection closed at
// once, so that a flood of connections costs little.
func (s *Server) turnAway(conn net.Conn, reply []byte, why rejectReason, now bool) {
	s.rejects.note(why)
	if now || s.rejecting.Add(1) > maxRejecting {
		if !now {
			s.rejecting.Add(-1)
		}
		// A fresh connection's send buffer is empty: this write does not
		// wait (the deadline is for connections that are not TCP's).
		conn.SetWriteDeadline(time.Now().Add(10 * time.Millisecond))
		conn.Write(reply)
		conn.Close()
		return
	}
	s.wg.Go(func() {
		defer s.rejecting.Add(-1)
		conn.SetDeadline(time.Now().Add(lingerTimeout))
		conn.Write(reply)
		closeWrite(conn)
		var buf [512]byte
		for {
			if _, err := conn.Read(buf[:]); err != nil {
				break
			}
		}
		conn.Close()
	})
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
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.Prefix{}
	}
	ip := ta.AddrPort().Addr().Unmap()
	if ip.Is4() {
		return netip.PrefixFrom(ip, 32)
	}
	p, _ := ip.Prefix(64)
	return p
}

// admit counts a new connection against its address: it may have at most
// maxPerIP users at once, and its bucket must have a connection left.
func (s *Server) admit(key netip.Prefix) rejectReason {
	if s.maxPerIP == 0 {
		return admitted
	}
	now := s.since()
	s.mu.Lock()
	defer s.mu.Unlock()
	a := s.addrs[key]
	if a == nil {
		if len(s.addrs) >= s.sweepAt {
			s.sweepAddrsLocked(now)
		}
		a = &addrUsage{}
		s.addrs[key] = a
	}
	switch {
	case a.users >= s.maxPerIP:
		return rejectAddrUsers
	case !a.arrival.take(now, 1, addrRefill/time.Duration(s.maxPerIP), 2*s.maxPerIP):
		return rejectAddrRate
	}
	a.users++
	return admitted
}

// sweepAddrsLocked forgets the addresses that have no user and a full
// bucket, as if they had never come; s.mu is held. It runs when the map
// has doubled since the last sweep, so it costs O(1) per connection.
func (s *Server) sweepAddrsLocked(now time.Duration) {
	for key, a := range s.addrs {
		if a.users == 0 && a.arrival.full <= now {
			delete(s.addrs, key)
		}
	}
	s.sweepAt = max(64, 2*len(s.addrs))
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
	full := max(b.full, now) + time.Duration(cost)*every
	if full-now > time.Duration(burst)*every {
		return false
	}
	b.full = full
	return true
}

// since is the monotonic time since the server's epoch: the clock of the
// idle kick and of the buckets, read once per line.
func (s *Server) since() time.Duration { return time.Since(s.epoch) }

// rejectReason says why a connection is turned away.
type rejectReason uint8

const (
	admitted            rejectReason = iota
	rejectFull                       // R9: -max-conns users online
	rejectNoDescriptors              // R9: no file descriptor left
	rejectAddrUsers                  // R11: -max-conns-per-ip users online from the address
	rejectAddrRate                   // R11: the address's bucket of connections is empty
	rejectAcceptFailed               // accept failed (out of descriptors or memory): not a connection
	rejectReasons
)

var rejectText = [rejectReasons]string{
	rejectFull:          "server full",
	rejectNoDescriptors: "no file descriptor left",
	rejectAddrUsers:     "too many users from the address",
	rejectAddrRate:      "too many connections from the address",
	rejectAcceptFailed:  "accept failed",
}

// rejectLog logs rejections at most once a second per reason, with the
// number since the last such line, so that a flood of connections cannot
// flood the log: the first at once, the rest at the end of its second.
type rejectLog struct {
	total   *[rejectReasons]atomic.Int64 // stats.rejected
	log     *slog.Logger
	mu      sync.Mutex
	counts  [rejectReasons]int
	pending [rejectReasons]*time.Timer // a second not yet over since the last line
}

func (l *rejectLog) note(why rejectReason) {
	l.total[why].Add(1)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.pending[why] != nil {
		l.counts[why]++
		return
	}
	l.pending[why] = time.AfterFunc(time.Second, func() { l.tick(why) })
	l.log.Info("reject", "reason", rejectText[why], "count", 1)
}

// tick ends a second: it logs what came in it, if anything, and then
// waits another.
func (l *rejectLog) tick(why rejectReason) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := l.counts[why]
	if n == 0 || l.pending[why] == nil {
		l.pending[why] = nil
		return
	}
	l.counts[why] = 0
	l.pending[why].Reset(time.Second)
	l.log.Info("reject", "reason", rejectText[why], "count", n)
}

// flush logs what is left, and stops the timers: Serve calls it as it
// returns.
func (l *rejectLog) flush() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for why, t := range l.pending {
		if t == nil {
			continue
		}
		t.Stop()
		l.pending[why] = nil
		if n := l.counts[why]; n > 0 {
			l.counts[why] = 0
			l.log.Info("reject", "reason", rejectText[why], "count", n)
		}
	}
}

// Handler serves one user, as the course's Handler does: it runs the
// select loop that writes the user's queue when it has something
// (nextBatch, ListenMessage) and kicks the user when no line came for
// s.idle. Once the user has left and its queue is written, Handler waits
// for the reader and closes the connection.
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
	s.addNameLocked(u)
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
		s.dropNameLocked(u)
	}
	s.releaseLocked(u.addrKey)
	s.mu.Unlock()
	s.stats.left[u.reason()].Add(1)
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

// bound is how many bytes may wait for one user now.
func (s *Server) bound() int {
	if s.queued.Load() > maxQueuedTotal {
		return tightQueuedBytes
	}
	return maxQueuedBytes
}

func (s *Server) fanOut(line []byte) {
	// One addition to the shared total for the whole fan-out, not one per
	// user; the users who do not take the line are taken off after.
	bound := s.bound()
	s.queued.Add(int64(len(line) * len(s.members)))
	s.round += len(s.members)
	lost := 0
	for _, u := range s.members {
		took, wake := u.push(line, bound, false)
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
	took, w := u.push(line, s.bound(), whole)
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

// rename gives u the name if no online user holds it, or one that folds
// like it (foldName): the check and the change are one critical section,
// so of two users racing for a free name exactly one wins.
func (s *Server) rename(u *User, name string) error {
	key := foldName(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, taken := s.taken[key]; taken {
		return errNameTaken
	}
	s.dropNameLocked(u)
	u.Name = name
	s.addNameLocked(u)
	return nil
}

// addNameLocked makes u's name known; s.mu is held.
func (s *Server) addNameLocked(u *User) {
	s.OnlineMap[u.Name] = u
	s.taken[foldName(u.Name)] = u
	i, _ := slices.BinarySearchFunc(s.sorted, u.Name, byName)
	s.sorted = slices.Insert(s.sorted, i, u)
	s.changedLocked()
}

// dropNameLocked forgets u's name; s.mu is held.
func (s *Server) dropNameLocked(u *User) {
	delete(s.OnlineMap, u.Name)
	delete(s.taken, foldName(u.Name))
	if i, found := slices.BinarySearchFunc(s.sorted, u.Name, byName); found {
		s.sorted = slices.Delete(s.sorted, i, i+1)
	}
	s.changedLocked()
}

func byName(u *User, name string) int { return strings.Compare(u.Name, name) }

// cost is what a line costs in flood-control units: see budgetUnits.
func (s *Server) cost(kind cmdKind, size int) int {
	if kind == cmdWho {
		return max(1, (int(s.conns.Load())+whoUnitUsers-1)/whoUnitUsers)
	}
	return max(1, (size+unitBytes-1)/unitBytes)
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
// sorted by name. The users are kept sorted as they come, go and rename,
// and the reply is built once per change of the room, outside the lock,
// and shared by every who until the next: in a big room a who costs a
// copy, not a sort.
func (s *Server) who() []byte {
	type entry struct{ name, addr string }
	s.mu.Lock()
	if s.whoReply != nil {
		defer s.mu.Unlock()
		return s.whoReply
	}
	version := s.version
	list := make([]entry, len(s.sorted))
	size := 0
	for i, u := range s.sorted {
		list[i] = entry{u.Name, u.Addr}
		size += len(u.Name) + len(u.Addr) + len("[]:在线...\n")
	}
	s.mu.Unlock()
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
