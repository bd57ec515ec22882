package llm

// Delta is the new output of one choice since its previous delta.
type Delta struct {
	// Index is the choice index, 0 ≤ Index < N.
	Index int
	// TokenIDs are the tokens generated in this step.
	TokenIDs []int32
	// Text is the detokenized increment; it never splits a UTF-8 character.
	Text string
	// FinishReason is empty until the last delta of the choice: "stop", "length", "abort" or "tool_calls".
	FinishReason string
	// StopReason is vLLM's stop_reason, set only on the last delta of a choice that a stop
	// condition ended: the matched stop string (a string) or the stop_token_ids token that
	// ended it (an int32). It is nil for EOS, length and abort, and on every other delta.
	StopReason any
	// Logprobs has one entry per token of TokenIDs when the request set SamplingParams.Logprobs,
	// and is nil otherwise.
	Logprobs []TokenLogprob
	// Reasoning is the increment of the reasoning text, with Request.Parsing.Reasoning.
	Reasoning string
	// ToolCalls are pieces of tool calls, with Request.Parsing.ToolCalls. FinishReason is
	// "tool_calls" on the last delta of a choice that called tools.
	ToolCalls []ToolCallDelta
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

// PromptLogprob is one entry of a prompt position's logprobs: vLLM's Logprob.
type PromptLogprob struct {
	TokenID int32
	Logprob float64 // natural log; -9999 stands for -inf
	// Rank is the token's rank at its position, 1 the most likely.
	Rank int
	// Token is the decoded token, as vLLM's decoded_token.
	Token string
}

// PromptPosition holds the logprobs of one prompt token, given the tokens before it.
type PromptPosition struct {
	// Token is the prompt token's text: decoded alone at position 0, else Entries[0].Token.
	Token string
	// Entries are the prompt token itself first, then the most likely tokens, most likely
	// first, without repeating a token id; nil at position 0, which has no logprob.
	Entries []PromptLogprob
}

// Usage counts the tokens of a finished request.
type Usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
}

// TotalTokens is PromptTokens + CompletionTokens.
func (u Usage) TotalTokens() int { return u.PromptTokens + u.CompletionTokens }
