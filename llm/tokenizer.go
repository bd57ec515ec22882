package llm

import (
	"context"
	"encoding/json"
)

// Tokenizer is implemented by generators that tokenize without generating (*engine.Engine
// does): the /tokenize and /detokenize routes and Anthropic's count_tokens use it. A server
// whose generator lacks it answers those routes 501.
type Tokenizer interface {
	// Tokenize renders and tokenizes req as Generate would for the same input.
	Tokenize(ctx context.Context, req TokenizeRequest) (TokenizeResult, error)
	// Detokenize decodes ids as the engine decodes output (special tokens skipped unless
	// the tokenizer keeps them).
	Detokenize(ctx context.Context, ids []int32) (string, error)
}

// TokenizeRequest is the input of [Tokenizer.Tokenize]: exactly one of Messages and Prompt.
type TokenizeRequest struct {
	// Messages are rendered with the chat template (with Tools) before tokenizing.
	Messages []Message `json:"messages,omitempty"`
	Prompt   string    `json:"prompt,omitempty"`
	// Tools are rendered into the prompt by the chat template, as for Request.Tools.
	Tools json.RawMessage `json:"tools,omitempty"`
	// AddSpecialTokens adds the tokenizer's special tokens (BOS, ...). vLLM's default is true
	// for a prompt and false for messages (the template writes them).
	AddSpecialTokens bool `json:"add_special_tokens"`
	// AddGenerationPrompt ends rendered messages with the assistant's turn header.
	AddGenerationPrompt bool `json:"add_generation_prompt"`
	// ContinueFinalMessage leaves the last (assistant) message open for the model to continue.
	ContinueFinalMessage bool `json:"continue_final_message,omitempty"`
	// ReturnTokenStrs asks for each token's text (TokenizeResult.TokenStrs).
	ReturnTokenStrs bool `json:"return_token_strs,omitempty"`
}

// TokenizeResult is the output of [Tokenizer.Tokenize].
type TokenizeResult struct {
	TokenIDs []int32 `json:"tokens"`
	// TokenStrs are the tokens' texts, with TokenizeRequest.ReturnTokenStrs.
	TokenStrs []string `json:"token_strs,omitempty"`
}
