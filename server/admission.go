package server

import (
	"context"
	"net/http"
	"sync/atomic"
	"time"
)

// retryAfter is the Retry-After header, in seconds, of answers that ask the client to come back.
const retryAfter = "1"

// admission bounds the requests that run at once; those beyond wait in a bounded queue, in
// arrival order, and those beyond the queue are refused.
type admission struct {
	slots    chan struct{} // one per running request; nil means no limit
	maxQueue int64
	running  atomic.Int64
	waiting  atomic.Int64
}

func newAdmission(maxConcurrent, maxQueue int) *admission {
	a := &admission{maxQueue: int64(max(maxQueue, 0))}
	if maxConcurrent > 0 {
		a.slots = make(chan struct{}, maxConcurrent)
	}
	return a
}

// admit waits for a slot for a request that arrived at start. It refuses with 429 when the
// queue is full, and with 503 when the request timeout passes in the queue or the server is
// shutting down; a nil release and a nil error mean the client went away while waiting.
func (s *Server) admit(ctx context.Context, start time.Time) (release func(), e *apiError) {
	a := s.admission
	if s.abortCtx.Err() != nil {
		return nil, errorf(http.StatusServiceUnavailable, "", "The server is shutting down.")
	}
	release = func() {
		a.running.Add(-1)
		if a.slots != nil {
			<-a.slots
		}
	}
	if a.slots == nil {
		a.running.Add(1)
		return release, nil
	}
	select {
	case a.slots <- struct{}{}:
		a.running.Add(1)
		return release, nil
	default:
	}
	if a.waiting.Add(1) > a.maxQueue {
		a.waiting.Add(-1)
		return nil, errorf(http.StatusTooManyRequests, "",
			"The server is busy: %d requests are running and %d waiting; retry later.", cap(a.slots), a.maxQueue)
	}
	defer a.waiting.Add(-1)
	var timeout <-chan time.Time
	if s.requestTimeout > 0 {
		t := time.NewTimer(s.requestTimeout - s.now().Sub(start))
		defer t.Stop()
		timeout = t.C
	}
	select {
	case a.slots <- struct{}{}:
		a.running.Add(1)
		return release, nil
	case <-ctx.Done():
		return nil, toAPIError(ctx.Err())
	case <-timeout:
		return nil, errorf(http.StatusServiceUnavailable, "",
			"The server is busy: the request waited %v in the queue without starting.", s.requestTimeout)
	case <-s.abortCtx.Done():
		return nil, errorf(http.StatusServiceUnavailable, "", "The server is shutting down.")
	}
}
