package engine

import (
	"errors"
	"fmt"
)

// Message is one turn of a chat conversation.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// SamplingParams controls decoding for one request. Zero values mean the defaults noted on each
// field; pointers distinguish "unset" from an explicit zero.
type SamplingParams struct {
	// MaxTokens caps the generated tokens per choice; 0 means until the context is full.
	MaxTokens int `json:"max_tokens,omitempty"`
	// Temperature scales the logits; 0 is greedy. Unset means 1.
	Temperature *float64 `json:"temperature,omitempty"`
	// TopP is the nucleus mass in (0, 1]. Unset means 1.
	TopP *float64 `json:"top_p,omitempty"`
	// TopK keeps the k most likely tokens; 0 means off.
	TopK int `json:"top_k,omitempty"`
	// Seed makes sampling reproducible for this request.
	Seed *int64 `json:"seed,omitempty"`
	// Stop strings end a choice; the matched string is not returned.
	Stop []string `json:"stop,omitempty"`
	// StopTokenIDs end a choice when generated.
	StopTokenIDs []int32 `json:"stop_token_ids,omitempty"`
	// IgnoreEOS keeps generating past the end-of-sequence token.
	IgnoreEOS bool `json:"ignore_eos,omitempty"`
	// N is the number of choices; 0 means 1.
	N int `json:"n,omitempty"`
	// MinP drops tokens less likely than MinP times the most likely one; 0 means off.
	MinP float64 `json:"min_p,omitempty"`
	// PresencePenalty, in [-2, 2], is subtracted from the logit of every token already
	// generated; 0 means off.
	PresencePenalty float64 `json:"presence_penalty,omitempty"`
	// FrequencyPenalty, in [-2, 2], is subtracted from a token's logit once per time it was
	// generated; 0 means off.
	FrequencyPenalty float64 `json:"frequency_penalty,omitempty"`
	// RepetitionPenalty divides positive (multiplies negative) logits of tokens seen in the
	// prompt or the output; 0 means unset, which is 1 (off).
	RepetitionPenalty float64 `json:"repetition_penalty,omitempty"`
	// MinTokens is the fewest tokens generated before EOS or a stop token may end a choice.
	MinTokens int `json:"min_tokens,omitempty"`
	// Logprobs, when set, asks for the log probability of every generated token and of the
	// *Logprobs most likely tokens at each position (0 to 20; Delta.Logprobs). Unset means none.
	// Only the vllm backend supports it.
	Logprobs *int `json:"logprobs,omitempty"`
}

// Request is one generation request. Exactly one of Messages, Prompt and PromptTokenIDs is set:
// Messages are rendered with the model's chat template, Prompt is tokenized as is.
type Request struct {
	// ID names the request in logs and in the backend; Generate assigns one when empty.
	ID             string         `json:"-"`
	Messages       []Message      `json:"messages,omitempty"`
	Prompt         string         `json:"prompt,omitempty"`
	PromptTokenIDs []int32        `json:"prompt_token_ids,omitempty"`
	Sampling       SamplingParams `json:"sampling"`
}

// Validate reports whether the request is well formed before it reaches the engine.
func (r *Request) Validate() error {
	n := 0
	if len(r.Messages) > 0 {
		n++
	}
	if r.Prompt != "" {
		n++
	}
	if len(r.PromptTokenIDs) > 0 {
		n++
	}
	if n != 1 {
		return &RequestError{Status: 400, Type: "BadRequestError", Message: "exactly one of messages, prompt and prompt_token_ids must be set"}
	}
	if r.Sampling.MaxTokens < 0 {
		return &RequestError{Status: 400, Type: "BadRequestError", Param: "max_tokens", Message: fmt.Sprintf("max_tokens must be at least 1, got %d", r.Sampling.MaxTokens)}
	}
	if r.Sampling.N < 0 {
		return &RequestError{Status: 400, Type: "BadRequestError", Param: "n", Message: fmt.Sprintf("n must be at least 1, got %d", r.Sampling.N)}
	}
	return nil
}

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

// RequestError is a failure of one request: the engine keeps serving others. Status is the HTTP
// status a server should answer with (400 for bad input, 500 for an engine error in that request).
type RequestError struct {
	Status  int
	Type    string
	Param   string
	Message string
}

func (e *RequestError) Error() string {
	return fmt.Sprintf("engine: request failed (%d %s): %s", e.Status, e.Type, e.Message)
}

// Sentinel errors of the engine package.
var (
	// ErrClosed is returned by Generate after Close.
	ErrClosed = errors.New("engine: closed")
	// ErrEngineDead means the engine can serve no more requests; a supervisor should restart it.
	ErrEngineDead = errors.New("engine: engine is dead")
	// ErrSlowConsumer ends a stream whose reader fell too far behind; the request is aborted.
	ErrSlowConsumer = errors.New("engine: stream reader too slow, request aborted")
	// ErrPythonNotFound means no usable Python interpreter was found.
	ErrPythonNotFound = errors.New("engine: no usable python")
	// ErrShim means the C shim or libpython could not be loaded.
	ErrShim = errors.New("engine: cannot load the shim")
	// ErrAlreadyStarted means an interpreter was already embedded in this process; CPython
	// cannot be initialized twice, so a process hosts at most one Engine.
	ErrAlreadyStarted = errors.New("engine: an engine was already started in this process")
)

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
}
