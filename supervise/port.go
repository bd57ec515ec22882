package supervise

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"github.com/govllm/govllm/registry"
)

// CheckPort reports whether e's host and port can be listened on. When they cannot, its error
// wraps ErrPortInUse and the system's error, and names the holder and the fix: the server
// among others (the other registry entries) that runs on that port, or "another process".
// The others' state is read only then, and left as it is (no stale pid file is removed).
func (s *Supervisor) CheckPort(e registry.Entry, others []registry.Entry) error {
	addr := net.JoinHostPort(e.Host, strconv.Itoa(e.Port))
	ln, err := net.Listen("tcp", addr)
	if err == nil {
		return ln.Close()
	}
	var cause error = err
	if op := (*net.OpError)(nil); errors.As(err, &op) {
		cause = op.Err // "bind: address already in use", without the address again
	}
	holder := "another process"
	if name, pid, ok := s.holder(e, others); ok {
		holder = fmt.Sprintf("server %s (pid %d; `govllm server stop %s` stops it)", name, pid, name)
	}
	return fmt.Errorf("supervise: port %d on %s is %w by %s (%w): stop it, or pick another port: "+
		"`govllm server start %s --port N` for this run, `govllm server add %s --replace --port N …` for good",
		e.Port, e.Host, ErrPortInUse, holder, cause, e.Name, e.Name)
}

// holder finds the server among others, other than e, that runs on e's port.
func (s *Supervisor) holder(e registry.Entry, others []registry.Entry) (name string, pid int, ok bool) {
	suffix := ":" + strconv.Itoa(e.Port)
	for _, o := range others {
		if o.Name == e.Name || o.Remote() {
			continue
		}
		st, err := s.State(o.Name)
		if err != nil {
			continue
		}
		ps, err := st.inspect()
		if err == nil && ps.Running && strings.HasSuffix(ps.URL, suffix) {
			return o.Name, ps.PID, true
		}
	}
	return "", 0, false
}
