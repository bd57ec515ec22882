package server

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"unicode/utf8"

	"github.com/govllm/govllm/llm"
)

// vLLM's extensions of chat and text completions: the chat-template options (echo,
// add_generation_prompt, continue_final_message, add_special_tokens, chat_template_kwargs,
// documents), prompt_logprobs, and the vLLM request fields govllm refuses rather than ignore.

// vllmRefused holds the fields of vLLM's chat and completion requests that govllm does not
// implement: each is a 400 naming it when set to anything but vLLM's default.
type vllmRefused struct {
	MMProcessorKwargs        json.RawMessage `json:"mm_processor_kwargs"`
	MediaIOKwargs            json.RawMessage `json:"media_io_kwargs"`
	Priority                 json.RawMessage `json:"priority"`
	CacheSalt                json.RawMessage `json:"cache_salt"`
	TruncatePromptTokens     json.RawMessage `json:"truncate_prompt_tokens"`
	TruncationSide           json.RawMessage `json:"truncation_side"`
	LogprobTokenIDs          json.RawMessage `json:"logprob_token_ids"`
	ReturnTokensAsTokenIDs   json.RawMessage `json:"return_tokens_as_token_ids"`
	ThinkingTokenBudget      json.RawMessage `json:"thinking_token_budget"`
	LengthPenalty            json.RawMessage `json:"length_penalty"`
	Watermarking             json.RawMessage `json:"watermarking"`
	KVTransferParams         json.RawMessage `json:"kv_transfer_params"`
	ECTransferParams         json.RawMessage `json:"ec_transfer_params"`
	VLLMXargs                json.RawMessage `json:"vllm_xargs"`
	RepetitionDetection      json.RawMessage `json:"repetition_detection"`
	StreamInterval           json.RawMessage `json:"stream_interval"`
	ReturnPromptText         json.RawMessage `json:"return_prompt_text"`
	RoutedExpertsPromptStart json.RawMessage `json:"routed_experts_prompt_start"`
	SessionID                json.RawMessage `json:"session_id"`
	PromptEmbeds             json.RawMessage `json:"prompt_embeds"`
}

// refusedField is one field of vllmRefused with the values that mean "unset" (null always does).
type refusedField struct {
	name     string
	raw      json.RawMessage
	defaults []string
}

// check answers 400 for the first refused field set to a value other than its default.
func (v *vllmRefused) check() *apiError {
	for _, f := range []refusedField{
		{"mm_processor_kwargs", v.MMProcessorKwargs, []string{"{}"}},
		{"media_io_kwargs", v.MediaIOKwargs, []string{"{}"}},
		{"priority", v.Priority, []string{"0"}},
		{"cache_salt", v.CacheSalt, nil},
		{"truncate_prompt_tokens", v.TruncatePromptTokens, nil},
		{"truncation_side", v.TruncationSide, nil},
		{"logprob_token_ids", v.LogprobTokenIDs, nil},
		{"return_tokens_as_token_ids", v.ReturnTokensAsTokenIDs, []string{"false"}},
		{"thinking_token_budget", v.ThinkingTokenBudget, nil},
		{"length_penalty", v.LengthPenalty, []string{"1", "1.0"}},
		{"watermarking", v.Watermarking, []string{"false"}},
		{"kv_transfer_params", v.KVTransferParams, nil},
		{"ec_transfer_params", v.ECTransferParams, nil},
		{"vllm_xargs", v.VLLMXargs, []string{"{}"}},
		{"repetition_detection", v.RepetitionDetection, nil},
		{"stream_interval", v.StreamInterval, []string{"1"}},
		{"return_prompt_text", v.ReturnPromptText, []string{"false"}},
		{"routed_experts_prompt_start", v.RoutedExpertsPromptStart, []string{"0"}},
		{"session_id", v.SessionID, nil},
		{"prompt_embeds", v.PromptEmbeds, nil},
	} {
		raw := string(bytes.TrimSpace(f.raw))
		if raw == "" || raw == "null" || slices.Contains(f.defaults, raw) {
			continue
		}
		return badRequest(f.name, "`%s` is not supported by this server.", f.name)
	}
	return nil
}

// applyPromptLogprobs validates prompt_logprobs (vLLM's rules: not with a stream unless 0, at
// most max_logprobs) into sp and p.
func (c *samplingRequest) applyPromptLogprobs(sp *llm.SamplingParams, p *callParams) *apiError {
	v := c.PromptLogprobs
	if v == nil {
		return nil
	}
	switch {
	case c.Stream && *v != 0:
		return badRequest("prompt_logprobs", "`prompt_logprobs` are not available when `stream=True`.")
	case *v < 0:
		return badRequest("prompt_logprobs", "`prompt_logprobs` must be a positive value or -1; -1 (the whole vocabulary) is above this server's max_logprobs=%d.", maxLogprobs)
	case *v > maxLogprobs:
		return badRequest("prompt_logprobs", "Requested prompt logprobs of %d, which is greater than max allowed: %d.", *v, maxLogprobs)
	}
	if c.Stream {
		return nil // 0 with a stream: vLLM computes them and never sends them
	}
	sp.PromptLogprobs = llm.Ptr(*v)
	p.promptLogprobs = true
	return nil
}

// reservedTemplateKwargs are chat_template_kwargs keys that are request fields of their own (or
// arguments of the renderer, not template variables).
var reservedTemplateKwargs = []string{
	"add_generation_prompt", "continue_final_message", "documents", "tools", "chat_template",
	"tokenize", "return_dict", "conversation", "messages",
}

// applyChatFields validates vLLM's chat-template options and echo into req and p.
func (c *chatRequest) applyChatFields(req *llm.Request, p *callParams) *apiError {
	if c.ChatTemplate != nil {
		return badRequest("chat_template", "Chat template is passed with request, but --trust-request-chat-template is not set. Refused request with untrusted chat template.")
	}
	addGen := c.AddGenerationPrompt == nil || *c.AddGenerationPrompt
	if c.ContinueFinalMessage && addGen {
		return badRequest("continue_final_message", "Cannot set both `continue_final_message` and `add_generation_prompt` to True (set add_generation_prompt to false).")
	}
	last := c.Messages[len(c.Messages)-1]
	for k := range c.ChatTemplateKwargs {
		if slices.Contains(reservedTemplateKwargs, k) {
			return badRequest("chat_template_kwargs", "chat_template_kwargs.%s: set it as a request field, not a template variable.", k)
		}
	}
	if !addGen || c.ContinueFinalMessage || c.AddSpecialTokens || len(c.ChatTemplateKwargs) > 0 || c.Documents != nil {
		req.Chat = &llm.ChatOptions{AddGenerationPrompt: addGen, ContinueFinalMessage: c.ContinueFinalMessage,
			AddSpecialTokens: c.AddSpecialTokens, TemplateKwargs: c.ChatTemplateKwargs, Documents: c.Documents}
	}
	// The response's role (vLLM's get_chat_request_role): the assistant's after a generation
	// prompt, else the last message's, as the client spelled it.
	if !addGen {
		p.role = last.Role
	}
	if c.Echo {
		echo := ""
		if p.respRole() == last.Role {
			echo = req.Messages[len(req.Messages)-1].Content
		}
		p.chatEcho = &echo
		// vLLM: echo asks for the prompt's logprobs too (top_logprobs of them), shown unstreamed.
		if req.Sampling.PromptLogprobs == nil && !c.Stream {
			top := 0
			if c.TopLogprobs != nil {
				top = *c.TopLogprobs
			}
			req.Sampling.PromptLogprobs = &top
			p.promptLogprobs = true
		}
	}
	return nil
}

// respRole is the role of a chat response's message.
func (p *callParams) respRole() string {
	if p.role == "" {
		return assistantRole
	}
	return p.role
}

// promptLogprobsSource is what a stream may offer for prompt_logprobs (engine.Stream does).
type promptLogprobsSource interface {
	PromptLogprobs() []llm.PromptPosition
}

// promptPositions returns the prompt's logprobs when the request asked for them, else nil.
func (c *call) promptPositions() []llm.PromptPosition {
	if !c.params.promptLogprobs && !c.params.echoLogprobs {
		return nil
	}
	if s, ok := c.stream.(promptLogprobsSource); ok {
		return s.PromptLogprobs()
	}
	return nil
}

// promptLogprobsJSON renders prompt positions as vLLM does: null for the first token, then per
// position an object from token id to {"logprob", "rank", "decoded_token"}.
type promptLogprobsJSON []llm.PromptPosition

// MarshalJSON writes the positions in vLLM's shape.
func (pl promptLogprobsJSON) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, pos := range pl {
		if i > 0 {
			b.WriteByte(',')
		}
		if pos.Entries == nil {
			b.WriteString("null")
			continue
		}
		b.WriteByte('{')
		for j, e := range pos.Entries {
			if j > 0 {
				b.WriteByte(',')
			}
			tok, err := json.Marshal(e.Token)
			if err != nil {
				return nil, fmt.Errorf("prompt logprob token: %w", err)
			}
			fmt.Fprintf(&b, `"%d":{"logprob":%s,"rank":%d,"decoded_token":%s}`, e.TokenID,
				strconv.FormatFloat(e.Logprob, 'g', -1, 64), e.Rank, tok)
		}
		b.WriteByte('}')
	}
	b.WriteByte(']')
	return b.Bytes(), nil
}

// promptLogprobsOut is the prompt_logprobs field of an answer: nil (left out) unless asked for.
func (c *call) promptLogprobsOut() *promptLogprobsJSON {
	if !c.params.promptLogprobs {
		return nil
	}
	pl := promptLogprobsJSON(c.promptPositions())
	if pl == nil {
		c.log.Error("the backend sent no prompt logprobs for a request that asked for them")
		pl = promptLogprobsJSON{}
	}
	return &pl
}

// echoTextLogprobs are the legacy logprobs of the echoed prompt (vLLM's completions with echo
// and logprobs): the first token's logprob and top entries are null; top holds the prompt
// token and the top most likely ones. It returns the text offset after the prompt.
func echoTextLogprobs(pos []llm.PromptPosition, top int) (*textLogprobs, int) {
	t := &textLogprobs{
		Tokens:        make([]string, len(pos)),
		TokenLogprobs: make([]*float64, len(pos)),
		TopLogprobs:   make([]map[string]float64, len(pos)),
		TextOffset:    make([]int, len(pos)),
	}
	offset := 0
	for i, p := range pos {
		t.Tokens[i] = p.Token
		t.TextOffset[i] = offset
		offset += utf8.RuneCountInString(p.Token)
		if len(p.Entries) == 0 {
			continue
		}
		lp := p.Entries[0].Logprob
		t.TokenLogprobs[i] = &lp
		m := make(map[string]float64, len(p.Entries))
		for j, e := range p.Entries {
			if j > top {
				break
			}
			if _, dup := m[e.Token]; !dup {
				m[e.Token] = e.Logprob
			}
		}
		t.TopLogprobs[i] = m
	}
	return t, offset
}

// joinTextLogprobs appends b's entries to a.
func joinTextLogprobs(a, b *textLogprobs) *textLogprobs {
	a.Tokens = append(a.Tokens, b.Tokens...)
	a.TokenLogprobs = append(a.TokenLogprobs, b.TokenLogprobs...)
	a.TopLogprobs = append(a.TopLogprobs, b.TopLogprobs...)
	a.TextOffset = append(a.TextOffset, b.TextOffset...)
	return a
}
