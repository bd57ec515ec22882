// Package server is govllm's OpenAI-compatible HTTP layer: it decodes and validates requests,
// runs them on an [llm.Generator] and writes the answers as JSON or server-sent events.
package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/govllm/govllm/llm"
)

// DefaultMaxBodyBytes is the request body limit when [Config.MaxBodyBytes] is zero.
const DefaultMaxBodyBytes = 16 << 20

// Config configures a [Server].
type Config struct {
	// Backend runs the requests; it is required.
	Backend llm.Generator
	// Logger receives the server's logs; nil means slog.Default().
	Logger *slog.Logger
	// MaxBodyBytes limits request bodies; larger ones get 413. Zero means DefaultMaxBodyBytes.
	MaxBodyBytes int64
	// APIKey, when set, is required as "Authorization: Bearer <key>" (or "x-api-key: <key>")
	// on the /v1/ routes.
	APIKey string
	// Stats, when set, adds the backend's own load to /metrics.
	Stats StatsFunc
	// Collectors are registered on /metrics next to the server's own metrics (for example the
	// GPU gauges of gpu.Monitor).
	Collectors []prometheus.Collector
	// HealthChecks are consulted by GET /health after the backend: the first error makes it
	// answer 503 with that error's message (for example gpu.Monitor after an XID error).
	HealthChecks []HealthChecker

	// MaxConcurrent bounds the completions that run at once; 0 means no bound. Requests
	// beyond it wait, in arrival order, in a queue of MaxQueue; beyond that they get 429 with
	// Retry-After.
	MaxConcurrent int
	// MaxQueue is how many requests may wait for one of MaxConcurrent slots.
	MaxQueue int
	// RequestTimeout bounds a completion from its arrival, queueing included; 0 means none.
	// Past it the request is aborted in the engine and answered with what it generated, its
	// unfinished choices ending with finish_reason "abort" (a request still queued gets 503).
	RequestTimeout time.Duration
	// WriteTimeout bounds each write to a client; a client that reads too slowly for it loses
	// its connection and its request is aborted, so it never holds up others. Zero means
	// DefaultWriteTimeout; negative, none.
	WriteTimeout time.Duration
	// Version is govllm's version for GET /version; empty (or "dev") means the build's own.
	Version string
}

// DefaultWriteTimeout is the per-write limit when [Config.WriteTimeout] is zero.
const DefaultWriteTimeout = 30 * time.Second

// Server is an http.Handler serving the OpenAI-compatible API: POST /v1/chat/completions,
// POST /v1/completions, GET /v1/models, GET /health and GET /metrics (Prometheus). Unknown paths get 404 and known paths with the wrong
// method get 405, both with an OpenAI error body.
type Server struct {
	backend      llm.Generator
	log          *slog.Logger
	maxBodyBytes int64
	apiKey       []byte
	created      int64 // unix time of New, the "created" of the model card
	mux          *http.ServeMux
	metrics      *metrics
	admission    *admission
	healthChecks []HealthChecker
	version      string // GET /version's "version"

	requestTimeout time.Duration
	writeTimeout   time.Duration
	abortCtx       context.Context // cancelled by AbortRequests
	abortAll       context.CancelFunc

	// Seams for tests.
	now   func() time.Time
	newID func(prefix string) string
}

// New returns a Server for cfg. It panics with [ErrNoBackend] if cfg.Backend is nil.
func New(cfg Config) *Server {
	if cfg.Backend == nil {
		panic(ErrNoBackend)
	}
	s := &Server{
		backend:      cfg.Backend,
		log:          cfg.Logger,
		maxBodyBytes: cfg.MaxBodyBytes,
		now:          time.Now,
		newID:        randomID,
		mux:          http.NewServeMux(),
		admission:    newAdmission(cfg.MaxConcurrent, cfg.MaxQueue),

		requestTimeout: cfg.RequestTimeout,
		writeTimeout:   cfg.WriteTimeout,
	}
	s.abortCtx, s.abortAll = context.WithCancel(context.Background())
	if s.writeTimeout == 0 {
		s.writeTimeout = DefaultWriteTimeout
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.maxBodyBytes <= 0 {
		s.maxBodyBytes = DefaultMaxBodyBytes
	}
	if cfg.APIKey != "" {
		s.apiKey = []byte(cfg.APIKey)
	}
	s.created = s.now().Unix()
	s.metrics = s.newMetrics(cfg.Stats)
	s.metrics.registry.MustRegister(cfg.Collectors...)
	s.healthChecks = cfg.HealthChecks
	s.version = govllmVersion(cfg.Version)
	s.routes()
	return s
}

// ServeHTTP answers one request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if s.writeTimeout > 0 {
		w = newDeadlineWriter(w, s.writeTimeout)
	}
	s.serveWithID(w, r)
}

// AbortRequests ends every completion in flight, for a shutdown whose drain time is over: each
// is aborted in the engine and answered with what it generated so far, its unfinished choices
// ending with finish_reason "abort" (streams then end with [DONE] as usual). Queued and later
// requests get 503.
func (s *Server) AbortRequests() {
	s.abortAll()
}

// routes registers the handlers, a 405 answer for each known path and a 404 for the rest.
func (s *Server) routes() {
	routes := []struct {
		method, path string
		auth         bool
		h            http.HandlerFunc
	}{
		{http.MethodPost, "/v1/chat/completions", true, s.handleChat},
		{http.MethodPost, "/v1/completions", true, s.handleCompletions},
		{http.MethodGet, "/v1/models", true, s.handleModels},
		// tokenize, detokenize, version
		{http.MethodPost, "/tokenize", false, s.handleTokenize}, // unguarded, as in vLLM (only /v1 is)
		{http.MethodPost, "/detokenize", false, s.handleDetokenize},
		{http.MethodGet, "/version", false, s.handleVersion},
		// embeddings
		{http.MethodPost, "/v1/embeddings", true, s.handleEmbeddings},
		// responses
		{http.MethodPost, "/v1/responses", true, s.handleResponses},
		// anthropic messages
		{http.MethodPost, "/v1/messages", true, s.handleMessages},
		{http.MethodPost, "/v1/messages/count_tokens", true, s.handleCountTokens},
		{http.MethodGet, "/health", false, s.handleHealth},
		{http.MethodGet, "/metrics", false, s.metrics.ServeHTTP},
	}
	allow := make(map[string][]string)
	var paths []string
	for _, rt := range routes {
		h := rt.h
		if rt.auth {
			h = s.authorize(h)
		}
		s.mux.Handle(rt.method+" "+rt.path, h)
		if allow[rt.path] == nil {
			paths = append(paths, rt.path)
		}
		allow[rt.path] = append(allow[rt.path], rt.method)
		if rt.method == http.MethodGet {
			allow[rt.path] = append(allow[rt.path], http.MethodHead)
		}
	}
	for _, p := range paths {
		s.mux.Handle(p, methodNotAllowed(allow[p]))
	}
	s.mux.HandleFunc("/v1/messages/", anthropicNotFound)
	s.mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorf(http.StatusNotFound, "", "Not found: %s %s", r.Method, r.URL.Path))
	})
}

// methodNotAllowed answers 405 naming the allowed methods.
func methodNotAllowed(methods []string) http.HandlerFunc {
	allowed := strings.Join(methods, ", ")
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Allow", allowed)
		e := errorf(http.StatusMethodNotAllowed, "", "Method %s is not allowed for %s; use %s.", r.Method, r.URL.Path, allowed)
		if isAnthropicPath(r.URL.Path) {
			writeAnthropicError(w, e)
			return
		}
		writeError(w, e)
	}
}

// authorize wraps h to require the API key, if one is configured.
func (s *Server) authorize(h http.HandlerFunc) http.HandlerFunc {
	if s.apiKey == nil {
		return h
	}
	return func(w http.ResponseWriter, r *http.Request) {
		auth := r.Header.Get("Authorization")
		const prefix = "bearer "
		ok := len(auth) > len(prefix) && strings.EqualFold(auth[:len(prefix)], prefix) &&
			subtle.ConstantTimeCompare([]byte(strings.TrimSpace(auth[len(prefix):])), s.apiKey) == 1
		if key := r.Header.Get("X-Api-Key"); !ok && key != "" {
			// Anthropic's clients send the key as x-api-key.
			ok = subtle.ConstantTimeCompare([]byte(strings.TrimSpace(key)), s.apiKey) == 1
		}
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="govllm"`)
			e := errorf(http.StatusUnauthorized, "", "Invalid or missing API key.")
			if isAnthropicPath(r.URL.Path) {
				writeAnthropicError(w, e)
				return
			}
			writeError(w, e)
			return
		}
		h(w, r)
	}
}

// randomID returns prefix followed by 16 random hex digits, like vLLM's request ids.
func randomID(prefix string) string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails.
	return prefix + hex.EncodeToString(b[:])
}
