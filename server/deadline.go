package server

import (
	"net/http"
	"time"
)

// deadlineWriter gives every write to the client, the status line included, its own deadline,
// so that a client that stops reading fails the write (and its handler returns, aborting its
// request) instead of blocking its handler forever. The deadline left after the last write
// also bounds what the HTTP server writes after the handler returns.
//
// Setting a deadline costs a timer update in the runtime's poller, which a streamed token
// would pay twice (write and flush): a deadline is renewed only once an eighth of the timeout
// has passed since it was set, so each write gets between 7/8 of the timeout and all of it.
type deadlineWriter struct {
	http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
	armed   time.Time // when the deadline was last set; zero: never
}

func newDeadlineWriter(w http.ResponseWriter, timeout time.Duration) *deadlineWriter {
	return &deadlineWriter{ResponseWriter: w, rc: http.NewResponseController(w), timeout: timeout}
}

// arm sets the write deadline. Writers without deadlines (test recorders) go without; on a
// connection already gone, the write that follows reports the failure.
func (d *deadlineWriter) arm() {
	now := time.Now()
	if !d.armed.IsZero() && now.Sub(d.armed) < d.timeout/8 {
		return
	}
	d.armed = now
	_ = d.rc.SetWriteDeadline(now.Add(d.timeout))
}

// WriteHeader sends the status line and header.
func (d *deadlineWriter) WriteHeader(status int) {
	d.arm()
	d.ResponseWriter.WriteHeader(status)
}

// Write writes body bytes.
func (d *deadlineWriter) Write(p []byte) (int, error) {
	d.arm()
	return d.ResponseWriter.Write(p)
}

// FlushError sends buffered bytes to the client (http.ResponseController.Flush uses it).
func (d *deadlineWriter) FlushError() error {
	d.arm()
	return d.rc.Flush()
}

// Flush is FlushError for callers that use http.Flusher.
func (d *deadlineWriter) Flush() { _ = d.FlushError() }

// Unwrap lets http.ResponseController reach the underlying writer.
func (d *deadlineWriter) Unwrap() http.ResponseWriter { return d.ResponseWriter }
