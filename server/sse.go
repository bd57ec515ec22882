package server

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// sseWriter writes server-sent events. Events are encoded into a reused buffer and go out
// together, then flushed, on each call to flush. The response header is written with the first
// flush, so an error found before any event can still be answered with a proper status.
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	buf     bytes.Buffer
	enc     *json.Encoder
	started bool
}

func newSSEWriter(w http.ResponseWriter) *sseWriter {
	s := &sseWriter{w: w, rc: http.NewResponseController(w)}
	s.enc = json.NewEncoder(&s.buf)
	s.enc.SetEscapeHTML(false)
	return s
}

var (
	sseData = []byte("data: ")
	sseDone = []byte("data: [DONE]\n\n")
)

// writeSSE appends the event `data: <v as JSON>\n\n` to the pending output. v is one of the
// server's own response types, which always encode.
func (s *sseWriter) writeSSE(v any) {
	s.buf.Write(sseData)
	if err := s.enc.Encode(v); err != nil { // Encode ends the JSON with '\n'.
		panic(fmt.Errorf("server: encode SSE event: %w", err))
	}
	s.buf.WriteByte('\n')
}

// writeDone appends the final `data: [DONE]` event.
func (s *sseWriter) writeDone() {
	s.buf.Write(sseDone)
}

// flush writes the pending events, with the response header first if it has not gone out yet,
// and flushes them to the client.
func (s *sseWriter) flush() error {
	if !s.started {
		s.started = true
		h := s.w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-cache")
		h.Set("Connection", "keep-alive")
		h.Set("X-Accel-Buffering", "no") // Ask nginx-style proxies not to buffer the stream.
		s.w.WriteHeader(http.StatusOK)
	}
	if s.buf.Len() > 0 {
		_, err := s.w.Write(s.buf.Bytes())
		s.buf.Reset()
		if err != nil {
			return fmt.Errorf("server: write SSE: %w", err)
		}
	}
	if err := s.rc.Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return fmt.Errorf("server: flush SSE: %w", err)
	}
	return nil
}
