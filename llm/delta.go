package llm

// Delta is the new output of one choice since its previous delta.
type Delta struct {
	// Index is the choice index, 0 ≤ Index < N.
	Index int
	// TokenIDs are the tokens generated in this step.
	TokenIDs []int32
	// Text is the detokenized increment; it never splits a UTF-8 character.
	Text string
	// FinishReason is empty until the last delta of the choice: "stop", "length" or "abort".
	FinishReason string
	// Logprobs has one entry per token of TokenIDs when the request set SamplingParams.Logprobs,
	// and is nil otherwise.
	Logprobs []TokenLogprob
}

// TokenLogprob is the log probability of one generated token.
type TokenLogprob struct {
	// Token is the token's text (the decoded token; a piece of a UTF-8 character decodes with
	// U+FFFD). Bytes are the UTF-8 bytes of Token.
	Token   string  `json:"token"`
	Logprob float64 `json:"logprob"` // natural log; -9999 stands for -inf
	Bytes   []int   `json:"bytes"`
	// Top holds the most likely tokens at this position, most likely first, at most
	// SamplingParams.Logprobs of them (nil within Top itself).
	Top []TokenLogprob `json:"top,omitempty"`
}

// Usage counts the tokens of a finished request.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
}

// TotalTokens is PromptTokens + CompletionTokens.
func (u Usage) TotalTokens() int { return u.PromptTokens + u.CompletionTokens }
