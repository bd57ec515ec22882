package server

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/govllm/govllm/llm"
)

// StatsFunc reports the engine's own view of its load (engine.Engine.Stats does).
type StatsFunc func(context.Context) (llm.Stats, error)

// Histogram buckets, in seconds, as vLLM's (vllm/v1/metrics/buckets.py), so that dashboards
// and alerts built for vLLM read govllm's metrics alike.
var (
	ttftBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
		2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0}
	itlBuckets = []float64{0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
		2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}
	e2eBuckets = []float64{0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
		50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0}
)

// finishReasons are the values of request_success_total's finished_reason label.
var finishReasons = []string{"stop", "length", "abort"}

// metrics are the server's Prometheus metrics and the /metrics handler that serves them.
type metrics struct {
	handler          http.Handler
	registry         *prometheus.Registry
	ttft             prometheus.Observer
	itl              prometheus.Observer
	e2e              prometheus.Observer
	promptTokens     prometheus.Counter
	generationTokens prometheus.Counter
	success          map[string]prometheus.Counter // by finish reason
	successVec       *prometheus.CounterVec
}

// ServeHTTP serves GET /metrics.
func (m *metrics) ServeHTTP(w http.ResponseWriter, r *http.Request) { m.handler.ServeHTTP(w, r) }

// finished counts a choice that ended with reason.
func (m *metrics) finished(reason string) {
	c, ok := m.success[reason]
	if !ok {
		c = m.successVec.WithLabelValues(reason)
	}
	c.Inc()
}

// newMetrics builds the metrics. Names follow vLLM's (reference/vllm-api.md §6) with the prefix
// "govllm:", labelled by model_name and engine ("0", as vLLM's first engine), so a vLLM
// dashboard works after renaming. The Go runtime's and the process's own metrics (go_goroutines,
// process_resident_memory_bytes, …) come along.
func (s *Server) newMetrics(stats StatsFunc) *metrics {
	reg := prometheus.NewRegistry()
	labels := prometheus.Labels{"model_name": s.backend.Model().ID, "engine": "0"}
	m := &metrics{registry: reg, success: map[string]prometheus.Counter{}}
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	hist := func(name, help string, buckets []float64) prometheus.Histogram {
		h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: name, Help: help, Buckets: buckets, ConstLabels: labels})
		reg.MustRegister(h)
		return h
	}
	m.ttft = hist("govllm:time_to_first_token_seconds",
		"Time from a request's arrival to its first generated token.", ttftBuckets)
	m.itl = hist("govllm:inter_token_latency_seconds",
		"Time between consecutive tokens of a choice.", itlBuckets)
	m.e2e = hist("govllm:e2e_request_latency_seconds",
		"Time from a request's arrival to the end of its answer, for requests that completed (finished or aborted by the server).", e2eBuckets)
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels})
		reg.MustRegister(c)
		return c
	}
	m.promptTokens = counter("govllm:prompt_tokens_total", "Prompt tokens of the requests that completed.")
	m.generationTokens = counter("govllm:generation_tokens_total", "Generated tokens, counted as they arrive.")
	m.successVec = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name:        "govllm:request_success_total",
		Help:        "Finished choices (a request has n), by finish reason.",
		ConstLabels: labels,
	}, []string{"finished_reason"})
	reg.MustRegister(m.successVec)
	for _, r := range finishReasons {
		m.success[r] = m.successVec.WithLabelValues(r)
	}

	a := s.admission
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "govllm:num_requests_running",
		Help:        "Completions admitted and not yet answered in full.",
		ConstLabels: labels,
	}, func() float64 { return float64(a.running.Load()) }))
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name:        "govllm:num_requests_waiting",
		Help:        "Completions waiting in the admission queue for a slot to run.",
		ConstLabels: labels,
	}, func() float64 { return float64(a.waiting.Load()) }))
	if stats != nil {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "govllm:backend_num_requests_running",
			Help:        "Requests the backend engine itself holds (running or waiting), as it reports them; -1 when it cannot tell or does not answer.",
			ConstLabels: labels,
		}, func() float64 {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			st, err := stats(ctx)
			if err != nil {
				return -1
			}
			return float64(st.BackendRunning)
		}))
	}
	m.handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	return m
}
