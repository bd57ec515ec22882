package server

import (
	"context"
	"errors"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/govllm/govllm/llm"
)

// vllmStandard is vLLM's standard set (vllm/v1/metrics/loggers.py PrometheusStatLogger) by the
// family name /metrics writes in its TYPE line, with the Prometheus type.
var vllmStandard = map[string]string{
	"vllm:num_requests_running":              "gauge",
	"vllm:num_requests_waiting":              "gauge",
	"vllm:kv_cache_usage_perc":               "gauge",
	"vllm:prefix_cache_queries_total":        "counter",
	"vllm:prefix_cache_hits_total":           "counter",
	"vllm:num_preemptions_total":             "counter",
	"vllm:prompt_tokens_total":               "counter",
	"vllm:generation_tokens_total":           "counter",
	"vllm:request_success_total":             "counter",
	"vllm:request_prompt_tokens":             "histogram",
	"vllm:request_generation_tokens":         "histogram",
	"vllm:iteration_tokens_total":            "histogram",
	"vllm:request_max_num_generation_tokens": "histogram",
	"vllm:request_params_n":                  "histogram",
	"vllm:request_params_max_tokens":         "histogram",
	"vllm:time_to_first_token_seconds":       "histogram",
	"vllm:inter_token_latency_seconds":       "histogram",
	"vllm:e2e_request_latency_seconds":       "histogram",
	"vllm:request_queue_time_seconds":        "histogram",
	"vllm:request_inference_time_seconds":    "histogram",
	"vllm:request_prefill_time_seconds":      "histogram",
	"vllm:request_decode_time_seconds":       "histogram",
	"vllm:cache_config_info":                 "gauge",
}

// scrape is /metrics parsed: the TYPE of each family and every sample line as "name{labels}" → value.
type scrape struct {
	types   map[string]string
	samples map[string]string
	lines   []string // sample lines, "name{labels} value"
}

func scrapeMetrics(t *testing.T, h http.Handler) scrape {
	t.Helper()
	rec := do(h, http.MethodGet, "/metrics", "")
	require.Equal(t, http.StatusOK, rec.Code)
	sc := scrape{types: map[string]string{}, samples: map[string]string{}}
	for line := range strings.SplitSeq(rec.Body.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			sc.types[name] = typ
			continue
		}
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		sc.samples[line[:i]] = line[i+1:]
		sc.lines = append(sc.lines, line)
	}
	return sc
}

// engineStatsFixture is what a vLLM engine reports after a few requests.
func engineStatsFixture() *llm.EngineStats {
	lat := []float64{0.3, 0.5, 0.8, 1.0}
	return &llm.EngineStats{
		Gauges:   map[string]float64{"num_requests_running": 2, "num_requests_waiting": 1, "kv_cache_usage_perc": 0.125},
		Counters: map[string]float64{"prefix_cache_queries": 120, "prefix_cache_hits": 64, "num_preemptions": 1},
		Histograms: map[string]llm.Histogram{
			"request_queue_time_seconds":     {Buckets: lat, Counts: []uint64{2, 1, 0, 0}, Sum: 0.9, Count: 3},
			"request_prefill_time_seconds":   {Buckets: lat, Counts: []uint64{3, 0, 0, 0}, Sum: 0.3, Count: 3},
			"request_decode_time_seconds":    {Buckets: lat, Counts: []uint64{0, 0, 1, 1}, Sum: 6.5, Count: 3},
			"request_inference_time_seconds": {Buckets: lat, Counts: []uint64{0, 0, 1, 1}, Sum: 7.0, Count: 3},
			"iteration_tokens_total":         {Buckets: []float64{1, 8, 16}, Counts: []uint64{5, 2, 0}, Sum: 30, Count: 8},
			"not_a_vllm_name":                {Buckets: []float64{1}, Counts: []uint64{1}, Sum: 1, Count: 1},
		},
		Info: map[string]map[string]string{"cache_config": {"block_size": "16", "cache_dtype": "auto",
			"enable_prefix_caching": "True", "__reserved": "x", "bad-name": "y"}},
	}
}

func TestMetricsVLLMStandardSet(t *testing.T) {
	t.Parallel()
	u := llm.Usage{PromptTokens: 7, CompletionTokens: 3}
	stream := scripted(u, nil,
		llm.Delta{Index: 0, Text: "a", TokenIDs: []int32{1}},
		llm.Delta{Index: 1, Text: "b", TokenIDs: []int32{2}, FinishReason: "length"},
		llm.Delta{Index: 0, Text: "c", TokenIDs: []int32{3}, FinishReason: "stop"},
	)
	s := newTestServer(t, backendWith(stream, nil), func(c *Config) {
		c.Stats = func(context.Context) (llm.Stats, error) {
			return llm.Stats{BackendRunning: 3, Engine: engineStatsFixture()}, nil
		}
	})
	rec := do(s, http.MethodPost, "/v1/chat/completions", hello+`,"n":2,"max_tokens":5,"stream":true}`)
	require.Equal(t, http.StatusOK, rec.Code)

	sc := scrapeMetrics(t, s)
	for name, typ := range vllmStandard {
		require.Equal(t, typ, sc.types[name], "%s: type", name)
	}
	// every vllm: family is one of vLLM's standard names, and carries model_name and engine
	// (cache_config_info, as vLLM's, carries engine and the cache config only)
	for name := range sc.types {
		if strings.HasPrefix(name, "vllm:") {
			require.Contains(t, vllmStandard, name, "a vllm: name outside vLLM's set")
		}
		require.False(t, strings.HasPrefix(name, "govllm:") && vllmStandard["vllm:"+strings.TrimPrefix(name, "govllm:")] != "" &&
			name != "govllm:num_requests_running" && name != "govllm:num_requests_waiting", "%s keeps a govllm: prefix", name)
	}
	for _, line := range sc.lines {
		if !strings.HasPrefix(line, "vllm:") {
			continue
		}
		require.Contains(t, line, `engine="0"`, line)
		if !strings.HasPrefix(line, "vllm:cache_config_info") {
			require.Contains(t, line, `model_name="test-model"`, line)
		}
	}

	for series, want := range map[string]string{
		// the engine's own figures, from the stats
		"vllm:num_requests_running" + lbl:                                                       "2",
		"vllm:num_requests_waiting" + lbl:                                                       "1",
		"vllm:kv_cache_usage_perc" + lbl:                                                        "0.125",
		"vllm:prefix_cache_queries_total" + lbl:                                                 "120",
		"vllm:prefix_cache_hits_total" + lbl:                                                    "64",
		"vllm:num_preemptions_total" + lbl:                                                      "1",
		"vllm:request_queue_time_seconds_count" + lbl:                                           "3",
		"vllm:request_queue_time_seconds_sum" + lbl:                                             "0.9",
		`vllm:request_queue_time_seconds_bucket{engine="0",model_name="test-model",le="0.5"}`:   "3",
		`vllm:request_queue_time_seconds_bucket{engine="0",model_name="test-model",le="+Inf"}`:  "3",
		`vllm:request_decode_time_seconds_bucket{engine="0",model_name="test-model",le="0.8"}`:  "1",
		`vllm:request_decode_time_seconds_bucket{engine="0",model_name="test-model",le="+Inf"}`: "3",
		"vllm:request_prefill_time_seconds_sum" + lbl:                                           "0.3",
		"vllm:request_inference_time_seconds_sum" + lbl:                                         "7",
		"vllm:iteration_tokens_total_count" + lbl:                                               "8",
		"govllm:backend_num_requests_running" + lbl:                                             "3",
		// measured by the server
		"vllm:request_params_n_count" + lbl:                                                           "1",
		"vllm:request_params_n_sum" + lbl:                                                             "2",
		"vllm:request_params_max_tokens_count" + lbl:                                                  "2",
		"vllm:request_params_max_tokens_sum" + lbl:                                                    "10",
		"vllm:request_prompt_tokens_count" + lbl:                                                      "2",
		"vllm:request_prompt_tokens_sum" + lbl:                                                        "14",
		"vllm:request_generation_tokens_sum" + lbl:                                                    "3",
		"vllm:request_max_num_generation_tokens_sum" + lbl:                                            "2",
		"vllm:prompt_tokens_total" + lbl:                                                              "7",
		"vllm:generation_tokens_total" + lbl:                                                          "3",
		`vllm:request_success_total{engine="0",finished_reason="repetition",model_name="test-model"}`: "0",
		"govllm:num_requests_running" + lbl:                                                           "0",
	} {
		require.Equal(t, want, sc.samples[series], series)
	}
	info := regexp.MustCompile(`^vllm:cache_config_info\{(.*)\} 1$`)
	var labels string
	for _, line := range sc.lines {
		if m := info.FindStringSubmatch(line); m != nil {
			labels = m[1]
		}
	}
	require.Equal(t, `block_size="16",cache_dtype="auto",enable_prefix_caching="True",engine="0"`, labels,
		"cache_config_info: the engine's labels (less what is not a label name) and engine")
	require.NotContains(t, sc.types, "vllm:not_a_vllm_name")
}

func TestMetricsEngineSeriesAbsentWhenNotReported(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	for _, tt := range []struct {
		name  string
		stats StatsFunc
		want  string // govllm:backend_num_requests_running
	}{
		{"no engine figures", func(context.Context) (llm.Stats, error) { calls.Add(1); return llm.Stats{BackendRunning: 1}, nil }, "1"},
		{"only gauges", func(context.Context) (llm.Stats, error) {
			calls.Add(1)
			return llm.Stats{Engine: &llm.EngineStats{Gauges: map[string]float64{"num_requests_running": 4}}}, nil
		}, "0"},
		{"engine does not answer", func(context.Context) (llm.Stats, error) { calls.Add(1); return llm.Stats{}, errors.New("down") }, "-1"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := newTestServer(t, backendWith(scripted(llm.Usage{}, nil), nil), func(c *Config) { c.Stats = tt.stats })
			before := calls.Load()
			sc := scrapeMetrics(t, s)
			require.Equal(t, int32(1), calls.Load()-before, "one stats call per scrape")
			require.Equal(t, tt.want, sc.samples["govllm:backend_num_requests_running"+lbl])
			for _, name := range []string{"vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
				"vllm:request_queue_time_seconds", "vllm:cache_config_info", "vllm:num_preemptions_total"} {
				require.NotContains(t, sc.types, name, "no fake zeros for what the engine does not report")
			}
			// the server's own figures are there whatever the engine reports
			require.Equal(t, "histogram", sc.types["vllm:time_to_first_token_seconds"])
			require.Equal(t, "counter", sc.types["vllm:request_success_total"])
			if tt.name == "only gauges" {
				require.Equal(t, "4", sc.samples["vllm:num_requests_running"+lbl])
			}
		})
	}
}

func TestTokenBuckets(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		max  int
		want []float64
	}{
		{100, []float64{1, 2, 5, 10, 20, 50, 100}},
		{2048, []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000}},
		{1, []float64{1}},
	} {
		require.Equal(t, tt.want, tokenBuckets(tt.max), tt.max)
	}
	require.Len(t, tokenBuckets(0), 19, "no context length: up to 2^20")
}
