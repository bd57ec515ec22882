package llm

// ModelInfo describes the model an engine serves.
type ModelInfo struct {
	// ID is the served model name clients put in "model".
	ID string
	// Root is the checkpoint directory.
	Root string
	// MaxModelLen is the context length the backend enforces.
	MaxModelLen int
	// Backend is the engine that runs the model: "transformers", "vllm" or a custom module.
	Backend string
	// BackendVersion is the backend library's version (vllm or transformers), when known.
	BackendVersion string
	// ToolCallParser is the tool-call parser the engine was started with for "auto" tool
	// choice (vLLM's --tool-call-parser name); empty when auto tool choice is off.
	ToolCallParser string
	// ReasoningParser is the reasoning parser the engine was started with; empty for none.
	ReasoningParser string
	// StructuredOutputs reports whether the backend applies SamplingParams' constraints:
	// StructuredOutputs (and so tool_choice "required" and named choices), LogitBias,
	// AllowedTokenIDs and BadWords.
	StructuredOutputs bool
	// Runner is what the model is loaded for: [RunnerGenerate] (chat and completions) or
	// [RunnerPooling] (embeddings); empty means generate (a backend that does not say).
	Runner string
	// Adapters are the LoRA adapters the engine loaded (--lora-modules): a request picks one by
	// naming it in "model" (Request.Adapter); empty when none.
	Adapters []Adapter
}

// Adapter is a LoRA adapter served beside the base model.
type Adapter struct {
	// Name is what clients put in "model" to use the adapter.
	Name string `json:"name"`
	// Path is the adapter's directory (adapter_config.json and its weights).
	Path string `json:"path"`
	// Base is the model the adapter was made for, listed as its parent in /v1/models; empty
	// means the served model.
	Base string `json:"base_model_name,omitempty"`
}

// Adapter returns the adapter named name, and whether there is one.
func (m ModelInfo) Adapter(name string) (Adapter, bool) {
	for _, a := range m.Adapters {
		if a.Name == name {
			return a, true
		}
	}
	return Adapter{}, false
}

// Stats is an engine's own view of its load.
type Stats struct {
	// BackendRunning is the number of requests the backend engine itself holds (running or
	// waiting), or -1 when the backend cannot tell.
	BackendRunning int `json:"backend_running"`
	// BridgeRequests is the number of requests the engine's bridge is serving.
	BridgeRequests int `json:"bridge_requests"`
	// HealthError is the backend's health error, empty when healthy.
	HealthError string `json:"health_error"`
	// Engine is the backend engine's own figures for /metrics, nil when it reports none.
	Engine *EngineStats `json:"engine,omitempty"`
}

// EngineStats is a backend engine's own figures, keyed by vLLM's metric names less the "vllm:"
// prefix (and a counter's "_total"): what its scheduler reports, aggregated since the start. A
// name the engine cannot measure is absent, not zero.
type EngineStats struct {
	// Gauges are the latest values (num_requests_running, num_requests_waiting, kv_cache_usage_perc).
	Gauges map[string]float64 `json:"gauges,omitempty"`
	// Counters are cumulative (prefix_cache_queries, prefix_cache_hits, num_preemptions).
	Counters map[string]float64 `json:"counters,omitempty"`
	// Histograms are cumulative (request_queue_time_seconds, iteration_tokens_total, …).
	Histograms map[string]Histogram `json:"histograms,omitempty"`
	// Info holds label sets of info metrics (cache_config: the engine's cache configuration).
	Info map[string]map[string]string `json:"info,omitempty"`
}

// Histogram is a cumulative histogram as an engine reports it.
type Histogram struct {
	// Buckets are the upper bounds, ascending (+Inf implied).
	Buckets []float64 `json:"buckets"`
	// Counts are the observations per bucket (not cumulative), one per bound; the rest of Count
	// fell above the last bound.
	Counts []uint64 `json:"counts"`
	// Sum is the sum of the observations.
	Sum float64 `json:"sum"`
	// Count is the number of observations.
	Count uint64 `json:"count"`
}
