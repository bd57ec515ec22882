package llm

import "context"

// Runner names: what [ModelInfo.Runner] reports (vLLM's --runner values).
const (
	// RunnerGenerate serves chat and completions (the default).
	RunnerGenerate = "generate"
	// RunnerPooling serves embeddings: the model's hidden states pooled per input.
	RunnerPooling = "pooling"
)

// Embedder is implemented by generators that can embed (*engine.Engine does, when its model
// runs on the pooling runner): POST /v1/embeddings uses it. A server whose generator lacks it
// answers that route 501.
type Embedder interface {
	// Embed pools one vector per input of req, in order. Bad input (an empty or too-long
	// input, dimensions the model does not support) is a *RequestError with status 400.
	Embed(ctx context.Context, req EmbedRequest) (EmbedResult, error)
}

// EmbedInput is one input of an [EmbedRequest]: a text to tokenize (with the tokenizer's
// special tokens) or token ids, exactly one of them.
type EmbedInput struct {
	Text     string  `json:"text,omitempty"`
	TokenIDs []int32 `json:"token_ids,omitempty"`
}

// EmbedRequest is the input of [Embedder.Embed].
type EmbedRequest struct {
	// ID names the request in the backend's logs (the response id).
	ID string `json:"request_id,omitempty"`
	// Inputs are embedded together, one vector each.
	Inputs []EmbedInput `json:"inputs"`
	// Dimensions, when set, truncates each vector to its first Dimensions values before
	// normalisation (Matryoshka); only models that declare Matryoshka dimensions accept it.
	Dimensions *int `json:"dimensions,omitempty"`
}

// EmbedResult is the output of [Embedder.Embed].
type EmbedResult struct {
	// Vectors holds one embedding per input, in input order.
	Vectors [][]float32
	// PromptTokens is the number of tokens of all inputs together.
	PromptTokens int
}
