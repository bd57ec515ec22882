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
}
