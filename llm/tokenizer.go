package llm

import (
	"context"
	"encoding/json"
)

// Tokenizer is implemented by generators that tokenize without generating (*engine.Engine
// does): the /tokenize and /detokenize routes and Anthropic's count_tokens use it. A server
// whose generator lacks it answers those routes 501.
type Tokenizer interface {
	// Tokenize renders and tokenizes req as Generate would for the same input: the ids a chat
	// request of the same messages and tools would count as prompt tokens. Bad input is a
	// *RequestError naming the field; a backend without a tokenizer answers one with status 501.
	Tokenize(ctx context.Context, req TokenizeRequest) (TokenizeResult, error)
	// Detokenize decodes ids as the tokenizer's decode does by default (vLLM's /detokenize):
	// special tokens are kept. An id outside the vocabulary is a *RequestError (param "tokens").
	Detokenize(ctx context.Context, ids []int32) (string, error)
}

// TokenizeRequest is the input of [Tokenizer.Tokenize]: exactly one of Messages and Prompt.
type TokenizeRequest struct {
	// ID names the request in the engine's logs (the server's request id); may be empty.
	ID string `json:"request_id,omitempty"`
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
	// ChatTemplateKwargs are extra variables for the chat template (vLLM's
	// chat_template_kwargs); the template's own arguments (tokenize, tools, ...) are refused.
	ChatTemplateKwargs map[string]any `json:"chat_template_kwargs,omitempty"`
	// ReturnTokenStrs asks for each token's text (TokenizeResult.TokenStrs).
	ReturnTokenStrs bool `json:"return_token_strs,omitempty"`
}

// TokenizeResult is the output of [Tokenizer.Tokenize].
type TokenizeResult struct {
	TokenIDs []int32 `json:"tokens"`
	// TokenStrs are the tokens' raw strings as convert_ids_to_tokens gives them ("Ġhello"),
	// with TokenizeRequest.ReturnTokenStrs.
	TokenStrs []string `json:"token_strs,omitempty"`
}
