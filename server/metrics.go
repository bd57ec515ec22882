package server

import (
	"context"
	"net/http"
	"regexp"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/govllm/govllm/llm"
)

// StatsFunc reports the engine's own view of its load (engine.Engine.Stats does).
type StatsFunc func(context.Context) (llm.Stats, error)

// statsTimeout bounds the engine's stats answer during a scrape.
const statsTimeout = time.Second

// Histogram buckets as vLLM's (vllm/v1/metrics/buckets.py), so that dashboards and alerts built
// for vLLM read govllm's metrics alike.
var (
	ttftBuckets = []float64{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
		2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0}
	itlBuckets = []float64{0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
		2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}
	e2eBuckets = []float64{0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
		50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0}
	nBuckets = []float64{1, 2, 5, 10, 20}
)

// defaultTokenBucketsMax caps the token-count buckets when the model reports no context length.
const defaultTokenBucketsMax = 1 << 20

// tokenBuckets is vLLM's request_tokens family: a 1-2-5 series up to the model's context length.
func tokenBuckets(maxModelLen int) []float64 {
	if maxModelLen <= 0 {
		maxModelLen = defaultTokenBucketsMax
	}
	var b []float64
	for scale := 1; ; scale *= 10 {
		for _, m := range []int{1, 2, 5} {
			if m*scale > maxModelLen {
				return b
			}
			b = append(b, float64(m*scale))
		}
	}
}

// finishReasons are the values of request_success_total's finished_reason label (vLLM's
// FinishReason, each exported from the start).
var finishReasons = []string{"stop", "length", "abort", "error", "repetition"}

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
	// per request (n, max_tokens, the longest choice) and per choice (prompt and generated tokens)
	requestPromptTokens     prometheus.Observer
	requestGenerationTokens prometheus.Observer
	maxGenerationTokens     prometheus.Observer
	paramsN                 prometheus.Observer
	paramsMaxTokens         prometheus.Observer
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

// requestDone records the size figures of a request that completed: its n and max_tokens (0:
// unset), the prompt's tokens and each choice's generated tokens.
func (m *metrics) requestDone(n, maxTokens, promptTokens int, choiceTokens []int) {
	m.paramsN.Observe(float64(n))
	longest := 0
	for _, k := range choiceTokens {
		m.requestPromptTokens.Observe(float64(promptTokens))
		m.requestGenerationTokens.Observe(float64(k))
		if maxTokens > 0 {
			m.paramsMaxTokens.Observe(float64(maxTokens))
		}
		longest = max(longest, k)
	}
	m.maxGenerationTokens.Observe(float64(longest))
}

// newMetrics builds the metrics. vLLM's standard set (reference/vllm-api.md §6) is served under
// vLLM's own names ("vllm:" prefix), labelled by model_name and engine ("0", as vLLM's first
// engine), so vLLM's dashboards and alerts work unchanged: the server measures the request-side
// figures (latencies, tokens, finish reasons, request parameters) and the engine reports its own
// (engineCollector). govllm's own figures (the admission queue, the backend's request count) are
// "govllm:". The Go runtime's and the process's own metrics (go_goroutines,
// process_resident_memory_bytes, …) come along.
func (s *Server) newMetrics(stats StatsFunc) *metrics {
	reg := prometheus.NewRegistry()
	model := s.backend.Model()
	labels := prometheus.Labels{"model_name": model.ID, "engine": "0"}
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
	m.ttft = hist("vllm:time_to_first_token_seconds",
		"Histogram of time to first token in seconds (from the request's arrival at the server).", ttftBuckets)
	m.itl = hist("vllm:inter_token_latency_seconds",
		"Histogram of inter-token latency in seconds.", itlBuckets)
	m.e2e = hist("vllm:e2e_request_latency_seconds",
		"Histogram of e2e request latency in seconds, for requests that completed (finished or aborted by the server).", e2eBuckets)
	tokens := tokenBuckets(model.MaxModelLen)
	m.requestPromptTokens = hist("vllm:request_prompt_tokens",
		"Number of prefill tokens processed (per choice of the completed requests).", tokens)
	m.requestGenerationTokens = hist("vllm:request_generation_tokens",
		"Number of generation tokens processed (per choice of the completed requests).", tokens)
	m.maxGenerationTokens = hist("vllm:request_max_num_generation_tokens",
		"Histogram of maximum number of requested generation tokens (the longest choice of a request).", tokens)
	m.paramsN = hist("vllm:request_params_n", "Histogram of the n request parameter.", nBuckets)
	m.paramsMaxTokens = hist("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", tokens)
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: labels})
		reg.MustRegister(c)
		return c
	}
	m.promptTokens = counter("vllm:prompt_tokens_total", "Number of prefill tokens processed (of the requests that completed).")
	m.generationTokens = counter("vllm:generation_tokens_total", "Number of generation tokens processed, counted as they arrive.")
	m.successVec = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name:        "vllm:request_success_total",
		Help:        "Count of successfully processed requests (finished choices: a request has n), by finish reason.",
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
		reg.MustRegister(newEngineCollector(stats, model.ID))
	}
	m.handler = promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	return m
}

// engineMetric is one of vLLM's standard metrics that the engine reports itself.
type engineMetric struct {
	name string // the key in llm.EngineStats: vLLM's name less "vllm:" (and a counter's "_total")
	kind prometheus.ValueType
	help string
}

// engineMetrics are the engine-side names served, as vLLM's PrometheusStatLogger documents them.
// Histograms are listed with kind prometheus.UntypedValue.
var engineMetrics = []engineMetric{
	{"num_requests_running", prometheus.GaugeValue, "Number of requests in model execution batches."},
	{"num_requests_waiting", prometheus.GaugeValue, "Number of requests waiting to be processed."},
	{"kv_cache_usage_perc", prometheus.GaugeValue, "KV-cache usage. 1 means 100 percent usage."},
	{"prefix_cache_queries", prometheus.CounterValue, "Prefix cache queries, in terms of number of queried tokens."},
	{"prefix_cache_hits", prometheus.CounterValue, "Prefix cache hits, in terms of number of cached tokens."},
	{"num_preemptions", prometheus.CounterValue, "Cumulative number of preemption from the engine."},
	{"iteration_tokens_total", prometheus.UntypedValue, "Histogram of number of tokens per engine_step."},
	{"request_queue_time_seconds", prometheus.UntypedValue, "Histogram of time spent in WAITING phase for request."},
	{"request_inference_time_seconds", prometheus.UntypedValue, "Histogram of time spent in RUNNING phase for request."},
	{"request_prefill_time_seconds", prometheus.UntypedValue, "Histogram of time spent in PREFILL phase for request."},
	{"request_decode_time_seconds", prometheus.UntypedValue, "Histogram of time spent in DECODE phase for request."},
}

// labelName is what Prometheus accepts as a label name (and does not reserve).
var labelName = regexp.MustCompile(`^[a-zA-Z_][a-zA-Z0-9_]*$`)

// engineCollector serves the engine's own figures, asking the engine once per scrape. It is an
// unchecked collector (Describe sends nothing): which series exist, and cache_config_info's
// labels, are the engine's to say. A figure the engine does not report has no series.
type engineCollector struct {
	stats   StatsFunc
	model   string
	descs   map[string]*prometheus.Desc
	running *prometheus.Desc
}

func newEngineCollector(stats StatsFunc, model string) *engineCollector {
	labels := prometheus.Labels{"model_name": model, "engine": "0"}
	c := &engineCollector{stats: stats, model: model, descs: map[string]*prometheus.Desc{}}
	for _, em := range engineMetrics {
		name := "vllm:" + em.name
		if em.kind == prometheus.CounterValue {
			name += "_total"
		}
		c.descs[em.name] = prometheus.NewDesc(name, em.help, nil, labels)
	}
	c.running = prometheus.NewDesc("govllm:backend_num_requests_running",
		"Requests the backend engine itself holds (running or waiting), as it reports them; -1 when it cannot tell or does not answer.",
		nil, labels)
	return c
}

// Describe sends nothing: the collector is unchecked.
func (c *engineCollector) Describe(chan<- *prometheus.Desc) {}

// Collect asks the engine for its stats and sends what it reports.
func (c *engineCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), statsTimeout)
	defer cancel()
	st, err := c.stats(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.running, prometheus.GaugeValue, -1)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.running, prometheus.GaugeValue, float64(st.BackendRunning))
	e := st.Engine
	if e == nil {
		return
	}
	for _, em := range engineMetrics {
		desc := c.descs[em.name]
		switch em.kind {
		case prometheus.GaugeValue:
			if v, ok := e.Gauges[em.name]; ok {
				ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v)
			}
		case prometheus.CounterValue:
			if v, ok := e.Counters[em.name]; ok {
				ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, v)
			}
		default:
			if h, ok := e.Histograms[em.name]; ok && len(h.Counts) == len(h.Buckets) {
				cumulative := make(map[float64]uint64, len(h.Buckets))
				var sum uint64
				for i, b := range h.Buckets {
					sum += h.Counts[i]
					cumulative[b] = sum
				}
				if m, err := prometheus.NewConstHistogram(desc, h.Count, h.Sum, cumulative); err == nil {
					ch <- m
				}
			}
		}
	}
	if info, ok := e.Info["cache_config"]; ok {
		if m, err := cacheConfigInfo(info); err == nil {
			ch <- m
		}
	}
}

// cacheConfigInfo is vllm:cache_config_info: a gauge at 1 labelled with the engine's cache
// configuration and engine="0" (as vLLM, no model_name). Keys that are not label names are left out.
func cacheConfigInfo(info map[string]string) (prometheus.Metric, error) {
	names := make([]string, 0, len(info)+1)
	values := make([]string, 0, len(info)+1)
	for k, v := range info {
		if k == "engine" || !labelName.MatchString(k) || strings.HasPrefix(k, "__") {
			continue
		}
		names = append(names, k)
		values = append(values, v)
	}
	names = append(names, "engine")
	values = append(values, "0")
	desc := prometheus.NewDesc("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", names, nil)
	return prometheus.NewConstMetric(desc, prometheus.GaugeValue, 1, values...)
}
