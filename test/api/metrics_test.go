package api

import (
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// vllmNames are vLLM's 23 standard metric families (vllm/v1/metrics/loggers.py
// PrometheusStatLogger) as /metrics names them in its TYPE lines, with their type.
var vllmNames = map[string]string{
	"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
	"vllm:prefix_cache_queries_total": "counter", "vllm:prefix_cache_hits_total": "counter",
	"vllm:num_preemptions_total": "counter", "vllm:prompt_tokens_total": "counter",
	"vllm:generation_tokens_total": "counter", "vllm:request_success_total": "counter",
	"vllm:request_prompt_tokens": "histogram", "vllm:request_generation_tokens": "histogram",
	"vllm:iteration_tokens_total": "histogram", "vllm:request_max_num_generation_tokens": "histogram",
	"vllm:request_params_n": "histogram", "vllm:request_params_max_tokens": "histogram",
	"vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
	"vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
	"vllm:request_inference_time_seconds": "histogram", "vllm:request_prefill_time_seconds": "histogram",
	"vllm:request_decode_time_seconds": "histogram", "vllm:cache_config_info": "gauge",
}

// notFromTransformers are the engine-side names the transformers backend cannot report (it gives
// only its scheduler's running/waiting requests and its KV cache usage).
var notFromTransformers = []string{"vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total",
	"vllm:iteration_tokens_total", "vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds",
	"vllm:request_prefill_time_seconds", "vllm:request_decode_time_seconds", "vllm:cache_config_info"}

// promText is a /metrics page: family types and sample lines.
type promText struct {
	types map[string]string
	lines []string
}

func getMetrics(t *testing.T, url string) promText {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url+"/metrics", nil)
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+apiKey)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode, string(b))
	p := promText{types: map[string]string{}}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "# TYPE "); ok {
			name, typ, _ := strings.Cut(rest, " ")
			p.types[name] = typ
		} else if line != "" && !strings.HasPrefix(line, "#") {
			p.lines = append(p.lines, line)
		}
	}
	return p
}

// value is the value of the sample whose name (before any label) is name; fails if absent.
func (p promText) value(t *testing.T, name string) float64 {
	t.Helper()
	for _, line := range p.lines {
		if strings.HasPrefix(line, name+"{") || strings.HasPrefix(line, name+" ") {
			v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			require.NoError(t, err, line)
			return v
		}
	}
	t.Fatalf("%s not in /metrics", name)
	return 0
}

func TestMetricsVLLMNames(t *testing.T) {
	forEach(t, func(t *testing.T, s server) {
		const requests = 3
		for i := range requests {
			body := `{"model":"` + model + `","max_tokens":4,"temperature":0,"messages":[{"role":"user","content":"Count to ` +
				strconv.Itoa(i+3) + `, please."}]}`
			req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, s.URL+"/v1/chat/completions", strings.NewReader(body))
			require.NoError(t, err)
			req.Header.Set("Authorization", "Bearer "+apiKey)
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			require.Equal(t, http.StatusOK, resp.StatusCode, string(b))
		}
		p := getMetrics(t, s.URL)
		for name := range p.types {
			if strings.HasPrefix(name, "vllm:") {
				require.Contains(t, vllmNames, name, "vllm: names only for vLLM's set")
			}
		}
		for _, line := range p.lines {
			if strings.HasPrefix(line, "vllm:") {
				require.Contains(t, line, `engine="0"`, line)
				if !strings.HasPrefix(line, "vllm:cache_config_info") { // vLLM's carries no model_name either
					require.Contains(t, line, `model_name="`+model+`"`, line)
				}
			}
		}
		want := vllmNames
		if s.Name != "vllm" {
			want = map[string]string{}
			for name, typ := range vllmNames {
				want[name] = typ
			}
			for _, name := range notFromTransformers {
				require.NotContains(t, p.types, name, "transformers: no engine figure, no series (not fake zeros)")
				delete(want, name)
			}
		}
		for name, typ := range want {
			require.Equal(t, typ, p.types[name], name)
		}
		require.GreaterOrEqual(t, p.value(t, "vllm:request_params_n_count"), float64(requests))
		require.GreaterOrEqual(t, p.value(t, "vllm:e2e_request_latency_seconds_count"), float64(requests))
		usage := p.value(t, "vllm:kv_cache_usage_perc")
		require.True(t, usage >= 0 && usage <= 1, "kv_cache_usage_perc %v", usage)
		require.GreaterOrEqual(t, p.value(t, "vllm:num_requests_running"), 0.0)
		if s.Name != "vllm" {
			return
		}
		require.Greater(t, p.value(t, "vllm:prefix_cache_queries_total"), 0.0)
		require.GreaterOrEqual(t, p.value(t, "vllm:request_queue_time_seconds_count"), float64(requests))
		require.GreaterOrEqual(t, p.value(t, "vllm:request_decode_time_seconds_count"), float64(requests))
		require.Greater(t, p.value(t, "vllm:request_inference_time_seconds_sum"), 0.0)
		require.GreaterOrEqual(t, p.value(t, "vllm:iteration_tokens_total_count"), float64(requests))
		require.Equal(t, 1.0, p.value(t, "vllm:cache_config_info"))
		require.GreaterOrEqual(t, p.value(t, "vllm:num_preemptions_total"), 0.0)
	})
}
