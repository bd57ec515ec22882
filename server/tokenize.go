package server

import (
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"sort"

	"github.com/govllm/govllm/llm"
)

// tokenizeRequest is the body of POST /tokenize: vLLM's TokenizeCompletionRequest (prompt) or
// TokenizeChatRequest (messages). Fields the server does not know are ignored, as on the other
// routes; vLLM's fields it does not implement are refused by name.
type tokenizeRequest struct {
	Model    string         `json:"model"`
	Prompt   *string        `json:"prompt"`
	Messages *[]chatMessage `json:"messages"`
	// AddSpecialTokens defaults to true for a prompt, false for messages (vLLM's defaults).
	AddSpecialTokens *bool `json:"add_special_tokens"`
	ReturnTokenStrs  *bool `json:"return_token_strs"`
	// Messages only.
	AddGenerationPrompt  *bool           `json:"add_generation_prompt"`
	ContinueFinalMessage *bool           `json:"continue_final_message"`
	Tools                json.RawMessage `json:"tools"`
	ChatTemplateKwargs   json.RawMessage `json:"chat_template_kwargs"`
	// Refused: a per-request template needs vLLM's --trust-request-chat-template, and there
	// is no multimodal input.
	ChatTemplate      json.RawMessage `json:"chat_template"`
	MediaIOKwargs     json.RawMessage `json:"media_io_kwargs"`
	MMProcessorKwargs json.RawMessage `json:"mm_processor_kwargs"`
}

// tokenizeResponse is the body of a /tokenize answer, vLLM's TokenizeResponse.
type tokenizeResponse struct {
	Count       int       `json:"count"`
	MaxModelLen int       `json:"max_model_len"`
	Tokens      []int32   `json:"tokens"`
	TokenStrs   *[]string `json:"token_strs"` // null unless return_token_strs
}

// detokenizeRequest is the body of POST /detokenize.
type detokenizeRequest struct {
	Model  string   `json:"model"`
	Tokens *[]int64 `json:"tokens"`
}

// detokenizeResponse is the body of a /detokenize answer.
type detokenizeResponse struct {
	Prompt string `json:"prompt"`
}

// templateReserved are the chat template arguments chat_template_kwargs may not set: the
// renderer's own (vLLM sets some of them over the client's; refusing says so).
var templateReserved = map[string]bool{
	"add_generation_prompt": true, "continue_final_message": true, "tokenize": true, "tools": true,
	"documents": true, "chat_template": true, "conversation": true, "messages": true,
	"return_dict": true, "return_tensors": true, "return_assistant_tokens_mask": true,
	"tokenizer_kwargs": true, "padding": true, "truncation": true, "max_length": true,
}

// tokenizer is the backend as an llm.Tokenizer, or the 501 of a backend that is not one.
func (s *Server) tokenizer() (llm.Tokenizer, *apiError) {
	tk, ok := s.backend.(llm.Tokenizer)
	if !ok {
		return nil, errorf(http.StatusNotImplemented, "", "This server's backend (%s) cannot tokenize without generating.",
			backendName(s.backend.Model()))
	}
	return tk, nil
}

// handleTokenize serves POST /tokenize.
func (s *Server) handleTokenize(w http.ResponseWriter, r *http.Request) {
	id := requestID(r, "tokenize-")
	log := s.log.With("request_id", id)
	var body tokenizeRequest
	if e := readJSON(w, r, s.maxBodyBytes, &body); e != nil {
		s.reject(w, log, e, e)
		return
	}
	info := s.backend.Model()
	req, e := body.toTokenize(info)
	if e != nil {
		s.reject(w, log, e, e)
		return
	}
	tk, e := s.tokenizer()
	if e != nil {
		s.reject(w, log, e, e)
		return
	}
	req.ID = id
	res, err := tk.Tokenize(r.Context(), req)
	if err != nil {
		s.reject(w, log, err, toAPIError(err))
		return
	}
	out := tokenizeResponse{Count: len(res.TokenIDs), MaxModelLen: info.MaxModelLen, Tokens: res.TokenIDs}
	if out.Tokens == nil {
		out.Tokens = []int32{}
	}
	if req.ReturnTokenStrs {
		strs := res.TokenStrs
		if len(strs) != len(res.TokenIDs) {
			err := fmt.Errorf("server: tokenize: the backend gave %d token strings for %d tokens", len(strs), len(res.TokenIDs))
			s.reject(w, log, err, errorf(http.StatusInternalServerError, "", "Internal server error"))
			return
		}
		out.TokenStrs = &strs
	}
	writeJSON(w, http.StatusOK, out)
}

// toTokenize validates b into the contract's request (ID not set).
func (b *tokenizeRequest) toTokenize(info llm.ModelInfo) (llm.TokenizeRequest, *apiError) {
	var req llm.TokenizeRequest
	if e := checkModel(b.Model, info); e != nil {
		return req, e
	}
	for _, f := range []struct {
		param string
		raw   json.RawMessage
		why   string
	}{
		{"chat_template", b.ChatTemplate, "a per-request chat template is not supported; start the server with --chat-template"},
		{"media_io_kwargs", b.MediaIOKwargs, "multimodal input is not supported"},
		{"mm_processor_kwargs", b.MMProcessorKwargs, "multimodal input is not supported"},
	} {
		if !isNull(f.raw) {
			return req, badRequest(f.param, "`%s`: %s.", f.param, f.why)
		}
	}
	req.ReturnTokenStrs = b.ReturnTokenStrs != nil && *b.ReturnTokenStrs
	switch {
	case b.Prompt != nil && b.Messages != nil:
		return req, badRequest("messages", "Send either `prompt` or `messages`, not both.")
	case b.Prompt == nil && b.Messages == nil:
		return req, badRequest("prompt", "Either `prompt` (a string) or `messages` (an array) is required.")
	case b.Prompt != nil:
		if *b.Prompt == "" {
			return req, badRequest("prompt", "`prompt` must be a non-empty string.")
		}
		for _, f := range []struct {
			param string
			set   bool
		}{
			{"add_generation_prompt", b.AddGenerationPrompt != nil},
			{"continue_final_message", b.ContinueFinalMessage != nil},
			{"tools", !isNull(b.Tools)},
			{"chat_template_kwargs", !isNull(b.ChatTemplateKwargs)},
		} {
			if f.set {
				return req, badRequest(f.param, "`%s` applies to `messages`, not to a `prompt`.", f.param)
			}
		}
		req.Prompt = *b.Prompt
		req.AddSpecialTokens = b.AddSpecialTokens == nil || *b.AddSpecialTokens
		return req, nil
	}
	// Messages: validated and converted exactly as a chat completion's (so the rendered
	// prompt is the one a chat request would get), tools included.
	chat := chatRequest{Model: b.Model, Messages: *b.Messages, Tools: b.Tools}
	if !isNull(b.Tools) {
		chat.ToolChoice = json.RawMessage(`"none"`) // render the tools; no parser needed
	}
	creq, _, e := chat.toEngine(info)
	if e != nil {
		return req, e
	}
	req.Messages, req.Tools = creq.Messages, creq.Tools
	req.ContinueFinalMessage = b.ContinueFinalMessage != nil && *b.ContinueFinalMessage
	// add_generation_prompt defaults to true, except beside continue_final_message.
	req.AddGenerationPrompt = !req.ContinueFinalMessage
	if b.AddGenerationPrompt != nil {
		req.AddGenerationPrompt = *b.AddGenerationPrompt
	}
	if req.AddGenerationPrompt && req.ContinueFinalMessage {
		return req, badRequest("continue_final_message", "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
	}
	req.AddSpecialTokens = b.AddSpecialTokens != nil && *b.AddSpecialTokens
	if !isNull(b.ChatTemplateKwargs) {
		var kw map[string]any
		if err := json.Unmarshal(b.ChatTemplateKwargs, &kw); err != nil || kw == nil {
			return req, badRequest("chat_template_kwargs", "`chat_template_kwargs` must be a JSON object.")
		}
		keys := make([]string, 0, len(kw))
		for k := range kw {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if templateReserved[k] {
				return req, badRequest("chat_template_kwargs", "`chat_template_kwargs` may not set %q: it is the renderer's own argument.", k)
			}
		}
		if len(kw) > 0 {
			req.ChatTemplateKwargs = kw
		}
	}
	return req, nil
}

// handleDetokenize serves POST /detokenize.
func (s *Server) handleDetokenize(w http.ResponseWriter, r *http.Request) {
	id := requestID(r, "tokenize-")
	log := s.log.With("request_id", id)
	var body detokenizeRequest
	if e := readJSON(w, r, s.maxBodyBytes, &body); e != nil {
		s.reject(w, log, e, e)
		return
	}
	if e := checkModel(body.Model, s.backend.Model()); e != nil {
		s.reject(w, log, e, e)
		return
	}
	if body.Tokens == nil || len(*body.Tokens) == 0 {
		e := badRequest("tokens", "`tokens` must be a non-empty array of token ids.")
		s.reject(w, log, e, e)
		return
	}
	ids := make([]int32, len(*body.Tokens))
	for i, t := range *body.Tokens {
		if t < 0 || t > math.MaxInt32 {
			e := badRequest("tokens", "Token id %d is out of vocabulary", t)
			s.reject(w, log, e, e)
			return
		}
		ids[i] = int32(t)
	}
	tk, e := s.tokenizer()
	if e != nil {
		s.reject(w, log, e, e)
		return
	}
	text, err := tk.Detokenize(r.Context(), ids)
	if err != nil {
		s.reject(w, log, err, toAPIError(err))
		return
	}
	writeJSON(w, http.StatusOK, detokenizeResponse{Prompt: text})
}
