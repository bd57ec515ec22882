package server

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"unicode/utf8"

	"github.com/govllm/govllm/llm"
)

// defaultCompletionMaxTokens is max_tokens of a text completion that sets none, as in OpenAI's
// API and vLLM.
const defaultCompletionMaxTokens = 16

// completionRequest is the body of POST /v1/completions. Fields the server does not know are
// ignored, as vLLM and OpenAI do.
type completionRequest struct {
	Model     string          `json:"model"`
	Prompt    json.RawMessage `json:"prompt"`
	MaxTokens *int            `json:"max_tokens"`
	Echo      bool            `json:"echo"`
	Logprobs  *int            `json:"logprobs"`
	Suffix    *string         `json:"suffix"`
	BestOf    *int            `json:"best_of"`
	// AddSpecialTokens false (vLLM: tokenize the prompt without BOS etc.) is refused.
	AddSpecialTokens *bool `json:"add_special_tokens"`
	samplingRequest
}

// completionPrompt is one prompt of a completion request: a text or token ids.
type completionPrompt struct {
	text string
	ids  []int32
}

// toEngine validates c against the served model and converts it into one engine request per
// prompt (the first carrying the shared fields), with p.n counting the choices of all prompts.
// echoes are the texts to put before each prompt's choices; an entry of a token-id prompt is
// left empty for the handler to decode.
func (c *completionRequest) toEngine(m llm.ModelInfo) (reqs []llm.Request, p callParams, prompts []completionPrompt, e *apiError) {
	p = callParams{n: 1, stream: c.Stream}
	if e = checkModel(c.Model, m); e != nil {
		return
	}
	if prompts, e = parsePrompts(c.Prompt); e != nil {
		return
	}
	var req llm.Request
	req.Adapter = adapterFor(c.Model, m)
	sp := &req.Sampling
	sp.MaxTokens = defaultCompletionMaxTokens
	if c.MaxTokens != nil {
		sp.MaxTokens = *c.MaxTokens
		if e = checkMaxTokens("max_tokens", sp.MaxTokens, m.MaxModelLen); e != nil {
			return
		}
	}
	if e = c.samplingRequest.apply(sp, &p, m); e != nil {
		return
	}
	switch {
	case c.Logprobs != nil && (*c.Logprobs < 0 || *c.Logprobs > maxLogprobs):
		e = badRequest("logprobs", "logprobs must be in [0, %d], got %d.", maxLogprobs, *c.Logprobs)
	case c.AddSpecialTokens != nil && !*c.AddSpecialTokens:
		e = badRequest("add_special_tokens", "add_special_tokens false is not supported on completions.")
	case c.Suffix != nil && *c.Suffix != "":
		e = badRequest("suffix", "suffix is not supported.")
	case c.BestOf != nil && *c.BestOf != p.n && *c.BestOf != 1:
		e = badRequest("best_of", "best_of is not supported.")
	case len(prompts)*p.n > maxBatchChoices:
		e = badRequest("prompt", "%d prompts with n=%d make %d choices; at most %d are allowed per request.",
			len(prompts), p.n, len(prompts)*p.n, maxBatchChoices)
	}
	if e != nil {
		return
	}
	if c.Logprobs != nil {
		n := *c.Logprobs
		sp.Logprobs = &n
		p.logprobs = true
		p.topLogprobs = n
		if c.Echo {
			// vLLM: the echoed prompt's logprobs lead the choice's (prompt_logprobs defaults to
			// logprobs), and the unstreamed choice carries them as prompt_logprobs too.
			p.echoLogprobs = true
			if sp.PromptLogprobs == nil {
				sp.PromptLogprobs = &n
				p.promptLogprobs = !c.Stream
			}
		}
	}
	if len(prompts) > 1 && m.MaxModelLen > 0 {
		// What can be checked before anything starts is: one prompt too long fails them all.
		for i, pr := range prompts {
			if pr.ids != nil && len(pr.ids)+sp.MaxTokens > m.MaxModelLen {
				e = badRequest("prompt", "This model's maximum context length is %d tokens. However, you requested "+
					"%d tokens (%d in prompt[%d], %d in the completion). Please reduce the length of the prompt or completion.",
					m.MaxModelLen, len(pr.ids)+sp.MaxTokens, len(pr.ids), i, sp.MaxTokens)
				return
			}
		}
	}
	reqs = make([]llm.Request, len(prompts))
	for i, pr := range prompts {
		reqs[i] = req
		reqs[i].Prompt, reqs[i].PromptTokenIDs = pr.text, pr.ids
	}
	p.n *= len(prompts)
	return
}

// parsePrompts decodes "prompt": a string, an array of token ids, or an array of either
// (several prompts, at most maxPrompts, all of one kind).
func parsePrompts(raw json.RawMessage) ([]completionPrompt, *apiError) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil, badRequest("prompt", "prompt is required.")
	}
	switch raw[0] {
	case '"':
		text, e := parseTextPrompt(raw, "prompt")
		if e != nil {
			return nil, e
		}
		return []completionPrompt{{text: text}}, nil
	case '[':
		var items []json.RawMessage
		if err := json.Unmarshal(raw, &items); err != nil {
			return nil, badRequest("prompt", "prompt must be a string, an array of token ids, or an array of those.")
		}
		if len(items) == 0 {
			return nil, badRequest("prompt", "prompt must not be empty.")
		}
		first := bytes.TrimSpace(items[0])
		if len(first) == 0 || (first[0] != '"' && first[0] != '[') {
			ids, e := parseTokenIDs(items, "prompt")
			if e != nil {
				return nil, e
			}
			return []completionPrompt{{ids: ids}}, nil
		}
		if len(items) > maxPrompts {
			return nil, badRequest("prompt", "A request may carry at most %d prompts, got %d.", maxPrompts, len(items))
		}
		out := make([]completionPrompt, len(items))
		for i, it := range items {
			it = bytes.TrimSpace(it)
			name := fmt.Sprintf("prompt[%d]", i)
			if len(it) == 0 || it[0] != first[0] {
				return nil, badRequest("prompt", "%s must be of the kind of prompt[0] (a list of prompts holds strings only, "+
					"or token-id arrays only), got %s.", name, it)
			}
			if it[0] == '"' {
				text, e := parseTextPrompt(it, name)
				if e != nil {
					return nil, e
				}
				out[i].text = text
				continue
			}
			var ids []json.RawMessage
			if err := json.Unmarshal(it, &ids); err != nil {
				return nil, badRequest("prompt", "%s must be an array of token ids.", name)
			}
			tokens, e := parseTokenIDs(ids, name)
			if e != nil {
				return nil, e
			}
			out[i].ids = tokens
		}
		return out, nil
	}
	return nil, badRequest("prompt", "prompt must be a string, an array of token ids, or an array of those.")
}

// parseTextPrompt decodes the JSON string raw, the prompt called name.
func parseTextPrompt(raw json.RawMessage, name string) (string, *apiError) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", badRequest("prompt", "%s is not a valid string: %v.", name, err)
	}
	if s == "" {
		return "", badRequest("prompt", "%s must not be empty.", name)
	}
	return s, nil
}

// parseTokenIDs decodes the token ids of the prompt called name.
func parseTokenIDs(items []json.RawMessage, name string) ([]int32, *apiError) {
	if len(items) == 0 {
		return nil, badRequest("prompt", "%s must not be empty.", name)
	}
	ids := make([]int32, len(items))
	for i, it := range items {
		var f float64
		if err := json.Unmarshal(it, &f); err != nil || f != math.Trunc(f) || f < 0 || f > math.MaxInt32 {
			return nil, badRequest("prompt", "%s[%d] must be a token id (a non-negative integer), got %s.", name, i, it)
		}
		ids[i] = int32(f)
	}
	return ids, nil
}

// handleCompletions serves POST /v1/completions.
func (s *Server) handleCompletions(w http.ResponseWriter, r *http.Request) {
	start := s.now()
	var body completionRequest
	if e := readJSON(w, r, s.maxBodyBytes, &body); e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	info := s.backend.Model()
	reqs, params, prompts, e := body.toEngine(info)
	if e != nil {
		s.reject(w, s.log, e, e)
		return
	}
	id := requestID(r, "cmpl-")
	log := s.log.With("request_id", id)
	c := &call{
		id:          id,
		created:     start.Unix(),
		model:       responseModel(reqs[0], info),
		fingerprint: fingerprint(info),
		params:      params,
		log:         log,
		start:       start,
		kind:        "text",
	}
	if body.Echo {
		if c.echoes, e = s.echoes(r.Context(), prompts); e != nil {
			s.reject(w, log, fmt.Errorf("server: echo: %w", e), e)
			return
		}
	}
	reqs[0].ID = id
	if len(reqs) > 1 {
		for i := range reqs {
			reqs[i].ID = subRequestID(id, i)
		}
		perPrompt := params.n / len(reqs)
		c.startStream = func(ctx context.Context) (llm.TokenStream, error) {
			return startBatch(ctx, s.backend, reqs, perPrompt)
		}
	}
	s.generate(w, r, reqs[0], c, textFormat{})
}

// echoes are the prompts' texts for echo: token-id prompts are decoded by the backend's
// tokenizer, and refused (400) when it has none.
func (s *Server) echoes(ctx context.Context, prompts []completionPrompt) ([]string, *apiError) {
	out := make([]string, len(prompts))
	for i, pr := range prompts {
		if pr.ids == nil {
			out[i] = pr.text
			continue
		}
		tok, ok := s.backend.(llm.Tokenizer)
		if !ok {
			return nil, badRequest("echo", "echo with a prompt of token ids needs a backend that detokenizes; "+
				"this one does not: send the prompt as text.")
		}
		text, err := tok.Detokenize(ctx, pr.ids)
		if err != nil {
			return nil, toAPIError(fmt.Errorf("server: detokenize prompt %d: %w", i, err))
		}
		out[i] = text
	}
	return out, nil
}

// textCompletion is a non-streamed text completion, and each of its streamed chunks
// ("text_completion" both).
type textCompletion struct {
	ID                string       `json:"id"`
	Object            string       `json:"object"`
	Created           int64        `json:"created"`
	Model             string       `json:"model"`
	Choices           []textChoice `json:"choices"`
	Usage             *usage       `json:"usage,omitempty"`
	SystemFingerprint string       `json:"system_fingerprint,omitempty"`
}

// textChoice is one choice of a text completion: its whole text, or a streamed increment.
type textChoice struct {
	Index        int           `json:"index"`
	Text         string        `json:"text"`
	Logprobs     *textLogprobs `json:"logprobs"` // null unless asked for
	FinishReason *string       `json:"finish_reason"`
	// StopReason is the matched stop string or stop token id on a choice's last chunk, else null.
	StopReason any      `json:"stop_reason"`
	TokenIDs   *[]int32 `json:"token_ids,omitempty"` // with return_token_ids
	// PromptTokenIDs (return_token_ids): with a choice's first chunk, or on every choice.
	PromptTokenIDs *[]int32 `json:"prompt_token_ids,omitempty"`
	// PromptLogprobs are vLLM's prompt_logprobs (unstreamed), when asked for.
	PromptLogprobs *promptLogprobsJSON `json:"prompt_logprobs,omitempty"`
}

// textLogprobs are the legacy completions logprobs of a choice (or of a streamed increment).
type textLogprobs struct {
	Tokens        []string             `json:"tokens"`
	TokenLogprobs []*float64           `json:"token_logprobs"` // null for an echoed prompt's first token
	TopLogprobs   []map[string]float64 `json:"top_logprobs"`
	TextOffset    []int                `json:"text_offset"`
}

// toTextLogprobs converts lps; offset is where the first token starts in the choice's text (in
// characters, as vLLM counts). As in vLLM, top_logprobs holds the sampled token too, so
// logprobs 0 gives it alone.
func toTextLogprobs(lps []llm.TokenLogprob, offset int) *textLogprobs {
	t := &textLogprobs{
		Tokens:        make([]string, len(lps)),
		TokenLogprobs: make([]*float64, len(lps)),
		TopLogprobs:   make([]map[string]float64, len(lps)),
		TextOffset:    make([]int, len(lps)),
	}
	for i, lp := range lps {
		t.Tokens[i] = lp.Token
		t.TokenLogprobs[i] = &lps[i].Logprob
		top := make(map[string]float64, len(lp.Top)+1)
		top[lp.Token] = lp.Logprob
		for _, e := range lp.Top {
			if _, dup := top[e.Token]; !dup { // the most likely of tokens that decode alike
				top[e.Token] = e.Logprob
			}
		}
		t.TopLogprobs[i] = top
		t.TextOffset[i] = offset
		offset += utf8.RuneCountInString(lp.Token)
	}
	return t
}

// textFormat writes text completions in vLLM's shape: one chunk per delta with the text and,
// on the last of a choice, its finish reason; the echoed prompt goes with a choice's first
// chunk.
type textFormat struct{}

func (textFormat) writeDelta(sw *sseWriter, c *call, d llm.Delta, first bool) {
	text := d.Text
	if first {
		text = c.echoOf(d.Index) + text
	}
	chunk := textCompletion{ID: c.id, Object: "text_completion", Created: c.created, Model: c.model}
	var one [1]textChoice
	one[0] = textChoice{Index: d.Index, Text: text}
	if c.params.tokenIDs {
		one[0].TokenIDs = nonNilIDs(d.TokenIDs)
		if first {
			one[0].PromptTokenIDs = c.choicePromptIDs(d.Index)
		}
	}
	if c.params.logprobs {
		if first && c.params.echoLogprobs {
			echo, off := echoTextLogprobs(c.promptPositions(), c.params.topLogprobs)
			c.textOffset[d.Index] = off
			one[0].Logprobs = joinTextLogprobs(echo, toTextLogprobs(d.Logprobs, off))
		} else {
			one[0].Logprobs = toTextLogprobs(d.Logprobs, c.textOffset[d.Index])
		}
		c.textOffset[d.Index] = advanceOffset(c.textOffset[d.Index], d.Logprobs)
	}
	if d.FinishReason != "" {
		one[0].FinishReason = &d.FinishReason
		one[0].StopReason = d.StopReason
		if !c.params.includeUsage {
			chunk.SystemFingerprint = c.fingerprint
		}
	}
	chunk.Usage = c.usageSoFar(d.Index, true)
	chunk.Choices = one[:]
	sw.writeSSE(&chunk)
}

func (textFormat) usageChunk(c *call, u usage) any {
	return &textCompletion{
		ID: c.id, Object: "text_completion", Created: c.created, Model: c.model,
		Choices: []textChoice{}, Usage: &u, SystemFingerprint: c.fingerprint,
	}
}

// advanceOffset is offset past the tokens of lps.
func advanceOffset(offset int, lps []llm.TokenLogprob) int {
	for _, lp := range lps {
		offset += utf8.RuneCountInString(lp.Token)
	}
	return offset
}

func (textFormat) response(c *call, outs []choiceOut, u usage) any {
	resp := textCompletion{
		ID:                c.id,
		Object:            "text_completion",
		Created:           c.created,
		Model:             c.model,
		Choices:           make([]textChoice, len(outs)),
		Usage:             &u,
		SystemFingerprint: c.fingerprint,
	}
	for i := range resp.Choices {
		resp.Choices[i] = textChoice{Index: i, Text: outs[i].text, FinishReason: &outs[i].reason,
			StopReason: outs[i].stopReason}
		if c.params.logprobs {
			if c.params.echoLogprobs {
				echo, off := echoTextLogprobs(c.promptPositions(), c.params.topLogprobs)
				resp.Choices[i].Logprobs = joinTextLogprobs(echo, toTextLogprobs(outs[i].logprobs, off))
			} else {
				resp.Choices[i].Logprobs = toTextLogprobs(outs[i].logprobs, 0)
			}
		}
		resp.Choices[i].PromptLogprobs = c.promptLogprobsOut()
		if c.params.tokenIDs {
			resp.Choices[i].TokenIDs = nonNilIDs(c.tokenIDs[i])
			resp.Choices[i].PromptTokenIDs = c.choicePromptIDs(i)
		}
	}
	return &resp
}
