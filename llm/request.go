package llm

import (
	"encoding/json"
	"fmt"
)

// MaxChoices bounds SamplingParams.N: the wire format numbers choices with 16 bits.
const MaxChoices = 1<<16 - 1

// Message is one turn of a chat conversation.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
	// ToolCalls are the calls an assistant message made.
	ToolCalls []ToolCall `json:"tool_calls,omitempty"`
	// ToolCallID is the call a "tool" message answers.
	ToolCallID string `json:"tool_call_id,omitempty"`
	// Name is the tool's name on a "tool" message (some templates print it).
	Name string `json:"name,omitempty"`
}

// Request is one generation request. Exactly one of Messages, Prompt and PromptTokenIDs is set:
// Messages are rendered with the model's chat template, Prompt is tokenized as is.
type Request struct {
	// ID names the request in logs on both sides of the engine and in the backend (vLLM's
	// request id); the server sets it from X-Request-Id or generates one. Empty means the
	// engine's own number.
	ID             string         `json:"request_id,omitempty"`
	Messages       []Message      `json:"messages,omitempty"`
	Prompt         string         `json:"prompt,omitempty"`
	PromptTokenIDs []int32        `json:"prompt_token_ids,omitempty"`
	Sampling       SamplingParams `json:"sampling"`
	// Tools are the functions the model may call (OpenAI's "tools" array), rendered into the
	// prompt by the chat template and given to the tool-call parser.
	Tools json.RawMessage `json:"tools,omitempty"`
	// Parsing, when set, splits the output into content, reasoning and tool calls.
	Parsing *Parsing `json:"parsing,omitempty"`
	// Chat, when set, holds vLLM's chat-rendering options; nil renders Messages as vLLM does
	// by default (a generation prompt added).
	Chat *ChatOptions `json:"chat,omitempty"`
	// Adapter is the LoRA adapter (ModelInfo.Adapters' Name) to generate with; empty means the
	// base model.
	Adapter string `json:"lora,omitempty"`
}

// ChatOptions are vLLM's chat-template options of a chat request.
type ChatOptions struct {
	// AddGenerationPrompt ends the rendered messages with the assistant's turn header (vLLM's
	// default, true).
	AddGenerationPrompt bool `json:"add_generation_prompt"`
	// ContinueFinalMessage renders the last message open (no end-of-turn), so the model
	// continues it; it excludes AddGenerationPrompt.
	ContinueFinalMessage bool `json:"continue_final_message"`
	// AddSpecialTokens adds the tokenizer's special tokens (BOS, ...) on top of the template's
	// (vLLM's add_special_tokens, false for chat by default).
	AddSpecialTokens bool `json:"add_special_tokens,omitempty"`
	// TemplateKwargs are extra variables for the chat template (vLLM's chat_template_kwargs).
	TemplateKwargs map[string]json.RawMessage `json:"chat_template_kwargs,omitempty"`
	// Documents are handed to the template for retrieval-augmented generation.
	Documents []map[string]string `json:"documents,omitempty"`
}

// Validate reports whether the request is well formed before it reaches the engine. It checks
// the shape and the bounds the engine's wire format needs; the HTTP layer checks more, with
// OpenAI's messages.
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
	if r.Chat != nil && r.Chat.AddGenerationPrompt && r.Chat.ContinueFinalMessage {
		return invalid("continue_final_message", "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
	}
	return r.Sampling.Validate()
}

// invalid is a 400 naming param.
func invalid(param, format string, args ...any) *RequestError {
	return &RequestError{Status: 400, Type: "BadRequestError", Param: param, Message: fmt.Sprintf(format, args...)}
}
