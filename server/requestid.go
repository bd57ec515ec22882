package server

import (
	"context"
	"log/slog"
	"net/http"
	"time"
)

// Request ids, as vLLM's --enable-request-id-headers (always on here): every request gets an
// id, the client's X-Request-Id when it sends a valid one, else one the server makes. The id
// is echoed in the X-Request-Id response header of every answer (errors, 401, 404 included),
// names the request in the access log line ("request_id"), and prefixes the engine request id
// and the body's "id" the way vLLM 0.32 builds them: "chatcmpl-<id>", "cmpl-<id>".

// requestIDHeader is the request and response header that carries the id.
const requestIDHeader = "X-Request-Id"

// maxRequestIDLen bounds a client's X-Request-Id: it names engine requests and log lines.
const maxRequestIDLen = 128

// requestIDKey is the context key of a request's id.
type requestIDKey struct{}

// requestID returns the id of r with prefix: prefix + the client's X-Request-Id, else prefix +
// the id the server made for r. Handlers use it for their engine request ids and response
// ids (requestID(r, "chatcmpl-")); outside [Server.ServeHTTP] it makes a fresh random id.
func requestID(r *http.Request, prefix string) string {
	if id, ok := r.Context().Value(requestIDKey{}).(string); ok && id != "" {
		return prefix + id
	}
	return randomID(prefix)
}

// checkRequestID validates a client's X-Request-Id values: at most one, at most
// maxRequestIDLen bytes of printable ASCII without spaces.
func checkRequestID(values []string) *apiError {
	if len(values) > 1 {
		return badRequest(requestIDHeader, "Only one %s header may be sent.", requestIDHeader)
	}
	if len(values) == 0 {
		return nil
	}
	id := values[0]
	if id == "" || len(id) > maxRequestIDLen {
		return badRequest(requestIDHeader, "The %s header must be 1 to %d characters long, got %d.",
			requestIDHeader, maxRequestIDLen, len(id))
	}
	for i := 0; i < len(id); i++ {
		if c := id[i]; c <= ' ' || c > '~' {
			return badRequest(requestIDHeader, "The %s header may only hold printable ASCII characters "+
				"without spaces; byte %d is 0x%02x.", requestIDHeader, i, c)
		}
	}
	return nil
}

// serveWithID gives r its request id, echoes it in the response header, answers a bad
// X-Request-Id with 400 (under a new id) and logs one line per request.
func (s *Server) serveWithID(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	values := r.Header.Values(requestIDHeader)
	bad := checkRequestID(values)
	var id string
	if bad == nil && len(values) == 1 {
		id = values[0]
	} else {
		id = s.newID("")
	}
	w.Header().Set(requestIDHeader, id)
	sw := &statusWriter{ResponseWriter: w}
	if bad != nil {
		writeError(sw, bad)
	} else {
		s.mux.ServeHTTP(sw, r.WithContext(context.WithValue(r.Context(), requestIDKey{}, id)))
	}
	level := slog.LevelInfo
	if r.URL.Path == "/health" || r.URL.Path == "/metrics" {
		level = slog.LevelDebug // polled by supervisors and scrapers
	}
	s.log.Log(r.Context(), level, "http request", "request_id", id, "method", r.Method, "path", r.URL.Path,
		"status", sw.statusCode(), "duration", time.Since(start))
}

// statusWriter records the status a handler answered with, for the access log.
type statusWriter struct {
	http.ResponseWriter
	status int
}

// WriteHeader records and sends the status line.
func (w *statusWriter) WriteHeader(status int) {
	if w.status == 0 {
		w.status = status
	}
	w.ResponseWriter.WriteHeader(status)
}

// Write writes body bytes (status 200 unless one was written).
func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the writer below (flushes, deadlines).
func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// statusCode is the status sent, 200 when the handler wrote nothing.
func (w *statusWriter) statusCode() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}
